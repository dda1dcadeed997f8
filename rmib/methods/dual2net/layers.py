"""Dual2Net's own layers: PyTorch's adaptive average pooling bins, bilinear upsampling and PSPNet's pyramid pooling module."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

PPM_BINS = (1, 2, 3, 6)


def _bin_edges(n, bins: int):
    """Start and end (exclusive) of each adaptive pooling cell along an axis of length n."""
    if isinstance(n, int):  # known when tracing: constants, no ops
        index = np.arange(bins)
        return (index * n) // bins, -((-(index + 1) * n) // bins)
    index = ops.arange(bins, dtype="int32")
    n = ops.cast(n, "int32")
    return (index * n) // bins, -((-(index + 1) * n) // bins)  # floor, ceil


def adaptive_average_pools(x, bins):
    """`adaptive_average_pool` for several bin counts, sharing one summed-area table."""
    dtype = x.dtype
    x = ops.cast(x, "float32")
    dynamic = ops.shape(x)
    height = x.shape[1] if x.shape[1] is not None else dynamic[1]
    width = x.shape[2] if x.shape[2] is not None else dynamic[2]
    table = ops.cumsum(ops.cumsum(x, axis=1), axis=2)
    table = ops.pad(table, [[0, 0], [1, 0], [1, 0], [0, 0]])
    pooled = []
    for b in bins:
        y0, y1 = _bin_edges(height, b)
        x0, x1 = _bin_edges(width, b)
        rows = ops.take(table, ops.concatenate([y0, y1]), axis=1)  # (B, 2b, W + 1, C)
        corners = ops.take(rows, ops.concatenate([x0, x1]), axis=2)  # (B, 2b, 2b, C)
        top, bottom = corners[:, :b], corners[:, b:]
        total = (bottom[:, :, b:] - bottom[:, :, :b]) - (top[:, :, b:] - top[:, :, :b])
        area = ops.cast((y1 - y0)[:, None] * (x1 - x0)[None, :], "float32")
        pooled.append(ops.cast(total / area[None, :, :, None], dtype))
    return pooled


def adaptive_average_pool(x, bins: int):
    """Average pooling of (B, H, W, C) to (B, bins, bins, C), as PyTorch's AdaptiveAvgPool2d.

    Output cell i along an axis of length n averages the input from
    floor(i * n / bins) to ceil((i + 1) * n / bins) (exclusive), so cells may
    overlap when n is not a multiple of `bins`, and H, W may be smaller than
    `bins`. Computed in float32 from a summed-area table, so it works with
    sizes known only at run time; returned in the input's dtype.
    """
    return adaptive_average_pools(x, (bins,))[0]


def _resize_bilinear(x, height, width):
    # Keras' resize needs a static size; the feature map's is known only at run time.
    return tf.image.resize(x, tf.stack([height, width]), method="bilinear")


@keras.saving.register_keras_serializable(package="rmib")
class BilinearUpsampling(keras.layers.Layer):
    """Bilinear upsampling by an integer factor (half-pixel centres, as `UpSampling2D`).

    Unlike `keras.layers.UpSampling2D` it also works when the input's size is
    known only at run time (e.g. a `tf.function` over (None, None, None, C)).

    Args:
        factor: the integer scale factor of both sides.
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        if int(factor) < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        self.factor = int(factor)

    def call(self, inputs):
        shape = ops.shape(inputs)
        resized = _resize_bilinear(inputs, shape[1] * self.factor, shape[2] * self.factor)
        return ops.cast(resized, inputs.dtype)

    def compute_output_shape(self, input_shape):
        def scale(side):
            return None if side is None else side * self.factor

        return (input_shape[0], scale(input_shape[1]), scale(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="rmib")
class PyramidPooling(keras.layers.Layer):
    """PSPNet's pyramid pooling module (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).

    For each bin count b: adaptive average pooling to b x b (`adaptive_average_pool`),
    a 1x1 convolution to `filters` channels, group normalisation with one group
    and ReLU, bilinear upsampling back to the input's size; the input and the b
    pyramids are concatenated: C + len(bins) * filters channels out.

    One group normalises each image's b x b x filters values on their own, as the
    Dual2Net authors' PPM does: batch norm there would see, per branch, a batch of
    2 images, i.e. two values per channel in the 1x1 bin, in training, and switch
    to moving statistics at inference. (Their bins end at the GroupNorm; rmib keeps
    PSPNet's ReLU after it.)

    Args:
        bins: the pyramid's bin counts ((1, 2, 3, 6) in PSPNet).
        filters: channels per pyramid level; None = C // len(bins) (512 for a
            2048-channel ResNet50 feature map, as PSPNet).
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def __init__(self, bins=PPM_BINS, filters=None, **kwargs):
        super().__init__(**kwargs)
        self.bins = tuple(int(b) for b in bins)
        if not self.bins or min(self.bins) < 1:
            raise ValueError(f"bins must be positive integers, got {bins}")
        if filters is not None and int(filters) < 1:
            raise ValueError(f"filters must be a positive integer, got {filters}")
        self.filters = None if filters is None else int(filters)

    def _width(self, channels):
        return self.filters or max(1, channels // len(self.bins))

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"PyramidPooling needs a known channel count, got {input_shape}")
        width = self._width(channels)
        policy = self.dtype_policy
        self.convs, self.norms = [], []
        for b in self.bins:
            conv = keras.layers.Conv2D(width, 1, use_bias=False, dtype=policy, name=f"bin{b}_conv")
            norm = keras.layers.GroupNormalization(groups=1, dtype=policy, name=f"bin{b}_gn")
            conv.build((None, None, None, channels))
            norm.build((None, None, None, width))
            # Sublayers made after `trainable=False` was set would come back trainable.
            conv.trainable = norm.trainable = self.trainable
            self.convs.append(conv)
            self.norms.append(norm)
        self.built = True

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        parts = [inputs]
        pooled = adaptive_average_pools(inputs, self.bins)
        for x, conv, norm in zip(pooled, self.convs, self.norms, strict=True):
            x = ops.relu(norm(conv(x)))
            parts.append(ops.cast(_resize_bilinear(x, shape[1], shape[2]), inputs.dtype))
        return ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        return (*input_shape[:-1], channels + len(self.bins) * self._width(channels))

    def get_config(self):
        config = super().get_config()
        config.update({"bins": list(self.bins), "filters": self.filters})
        return config
