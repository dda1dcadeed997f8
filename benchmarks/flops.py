"""Analytic FLOP counts of Keras models (DESIGN.md "How performance is counted").

FLOPs of a model = 2 x the multiply-adds of its convolution and dense layers for
one input, counted from the layer shapes; biases, batch norms, activations,
pooling and element-wise ops are not counted. A training step counts three
forward passes (`TRAIN_STEP_FACTOR`): the forward pass, and the backward pass's
two products (gradients of the inputs and of the weights).

The shapes each layer sees are found by tracing the model once (no maths is run)
on an input of the given shape: every call of every counted layer is recorded,
including layers inside nested models (the classifier's "backbone") and the
sublayers of custom layers (CBAM's shared MLP, called twice, and its 7x7 conv).
"""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf

TRAIN_STEP_FACTOR = 3

_CONV = keras.src.layers.convolutional.base_conv.BaseConv
_CONV_TRANSPOSE = keras.src.layers.convolutional.base_conv_transpose.BaseConvTranspose
_DEPTHWISE = keras.src.layers.convolutional.base_depthwise_conv.BaseDepthwiseConv
_SEPARABLE = keras.src.layers.convolutional.base_separable_conv.BaseSeparableConv
COUNTED_LAYERS = (keras.layers.Dense, _CONV, _CONV_TRANSPOSE, _DEPTHWISE, _SEPARABLE)


def _shape(tensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(d is None for d in shape):
        raise ValueError(f"model_flops needs fully known shapes, got {shape}")
    return tuple(int(d) for d in shape)


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _split(shape, layer) -> tuple[int, tuple[int, ...], int]:
    """(batch, spatial dims, channels) of a conv input or output."""
    if _channels_last(layer):
        return shape[0], shape[1:-1], shape[-1]
    return shape[0], shape[2:], shape[1]


def layer_multiply_adds(layer, input_shape, output_shape) -> int:
    """Multiply-adds of one call of a counted layer, over its whole batch.

    Args:
        layer: a Dense, Conv*D, Conv*DTranspose, DepthwiseConv*D or SeparableConv*D.
        input_shape, output_shape: the shapes of that call, batch axis first.

    Returns:
        The multiply-adds of the call (0 for other layer types). The batch axis
        counts: CBAM runs its shared MLP once on the average and maximum
        descriptors stacked along the batch, i.e. twice per image.
    """
    if isinstance(layer, keras.layers.Dense):
        # Dense acts on the last axis at every position of the other axes.
        positions = math.prod(input_shape[:-1])
        return positions * input_shape[-1] * output_shape[-1]
    batch, in_spatial, in_channels = _split(input_shape, layer)
    _, out_spatial, out_channels = _split(output_shape, layer)
    kernel = math.prod(layer.kernel_size)
    return batch * _conv_multiply_adds(
        layer, in_spatial, in_channels, out_spatial, out_channels, kernel
    )


def _conv_multiply_adds(layer, in_spatial, in_channels, out_spatial, out_channels, kernel):
    if isinstance(layer, _SEPARABLE):
        depthwise_out = in_channels * layer.depth_multiplier
        depthwise = math.prod(out_spatial) * depthwise_out * kernel
        return depthwise + math.prod(out_spatial) * depthwise_out * out_channels
    if isinstance(layer, _DEPTHWISE):
        return math.prod(out_spatial) * out_channels * kernel
    if isinstance(layer, _CONV_TRANSPOSE):
        # Every input position scatters a kernel-sized patch into every output channel.
        return math.prod(in_spatial) * in_channels * kernel * out_channels
    if isinstance(layer, _CONV):
        groups = int(getattr(layer, "groups", 1) or 1)
        return math.prod(out_spatial) * out_channels * kernel * (in_channels // groups)
    return 0


def _all_layers(model):
    seen = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            yield layer


@contextlib.contextmanager
def _recording(model, calls: list):
    """Record (layer, input shape, output shape) of each counted layer's calls."""
    wrapped = []
    for layer in _all_layers(model):
        if not isinstance(layer, COUNTED_LAYERS):
            continue

        def recorder(inputs, *args, _layer=layer, _call=layer.call, **kwargs):
            outputs = _call(inputs, *args, **kwargs)
            calls.append((_layer, _shape(inputs), _shape(outputs)))
            return outputs

        # An instance attribute shadows the class's `call` for Layer.__call__.
        object.__setattr__(layer, "call", recorder)
        wrapped.append(layer)
    try:
        yield
    finally:
        for layer in wrapped:
            object.__delattr__(layer, "call")


def layer_flops(model, input_shape) -> list[tuple[str, int]]:
    """(layer name, forward FLOPs for one input) for every call of a counted layer.

    Args:
        model: a Keras model (functional, sequential or subclassed) with one input.
        input_shape: the shape of one input without the batch axis, e.g. (480, 480, 3).

    Returns:
        A list in call order; a layer called twice appears twice.
    """
    input_shape = tuple(int(d) for d in input_shape)
    calls: list = []
    spec = tf.TensorSpec((1, *input_shape), model.inputs[0].dtype if model.inputs else tf.float32)
    with _recording(model, calls):
        # Tracing runs every layer's Python `call` with shaped symbolic tensors;
        # nothing is computed.
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    return [
        (layer.name, 2 * layer_multiply_adds(layer, shape_in, shape_out))
        for layer, shape_in, shape_out in calls
    ]


def model_flops(model, input_shape) -> int:
    """Forward FLOPs of `model` for one input of `input_shape` (no batch axis).

    2 x the multiply-adds of every Conv*D, Conv*DTranspose, DepthwiseConv*D,
    SeparableConv*D and Dense call, nested sub-models and custom layers included.
    A training step costs `TRAIN_STEP_FACTOR` times this.

    Example:
        >>> model_flops(build_classifier("vgg16", image_size=480), (480, 480, 3))
    """
    return sum(flops for _, flops in layer_flops(model, input_shape))


__all__ = [
    "COUNTED_LAYERS",
    "TRAIN_STEP_FACTOR",
    "layer_flops",
    "layer_multiply_adds",
    "model_flops",
]
