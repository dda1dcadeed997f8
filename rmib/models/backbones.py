"""VGG16 and ResNet50 feature extractors, optionally with CBAM, exposing named skip taps.

rmib builds the backbones itself (rather than calling `keras.applications`) so that
CBAM can sit inside them where the CBAM paper puts it, while every plain layer keeps
its `keras.applications` name: the ImageNet weight files of keras.applications then
load by layer name, CBAM layers keep their initialisation.

References:
    Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition", ICLR 2015. He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016. Woo et al., "CBAM: Convolutional Block Attention
    Module", ECCV 2018. Ortiz-Feregrino et al., "Retinal Lesion Segmentation Using
    Transfer Learning with an Encoder-Decoder CNN".
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import keras

from rmib import choices
from rmib.errors import RmibError
from rmib.models.layers import CBAM, FusedBatchNormalization, ImageNetPreprocessing

_BN_EPSILON = 1.001e-5  # keras.applications ResNet50's value
# VGG16 has no batch norm: trained from scratch (weights none), Glorot's initialisation
# (keras.applications' default) shrinks the signal through its 13 ReLU convolutions, and
# with CBAM the deep taps vanish (std ~1e-3 at P4); He et al. 2015's initialisation keeps
# it (they train VGG-like nets from scratch with it). The first convolution also divides by
# the input's spread: "caffe" pixels (0-255 minus the mean) have a std of about 64, so
# the features stay O(1) as in a batch-normalised net instead of O(100), which would
# saturate the untrained head. ImageNet or PATH weights replace all of this.
_CAFFE_PIXEL_STD = 64.0


def _vgg_initializer(block, index):
    scale = 2.0 / _CAFFE_PIXEL_STD**2 if (block, index) == (1, 1) else 2.0
    return keras.initializers.VarianceScaling(scale, mode="fan_in", distribution="truncated_normal")


def _vgg16(inputs, cbam, output_stride=32, cbam_init="identity"):
    del output_stride  # VGG16 is built at stride 32 only (checked by build_backbone)
    x = ImageNetPreprocessing(name="preprocess")(inputs)
    taps = {}
    for block, (filters, convs) in enumerate(
        [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1
    ):
        for index in range(1, convs + 1):
            x = keras.layers.Conv2D(
                filters,
                3,
                activation="relu",
                padding="same",
                kernel_initializer=_vgg_initializer(block, index),
                name=f"block{block}_conv{index}",
            )(x)
        if cbam:
            x = CBAM(init=cbam_init, name=f"block{block}_cbam")(x)
        taps[f"P{block - 1}"] = x
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    taps["P5"] = x
    return taps


def _bottleneck(x, filters, stride, conv_shortcut, cbam, name, dilation=1, cbam_init="identity"):
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = FusedBatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = FusedBatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    # Dilation changes no weight shape: the same kernels see a wider field (DeepLab, PSPNet).
    x = keras.layers.Conv2D(
        filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv"
    )(x)
    x = FusedBatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = FusedBatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_3_bn")(x)
    if cbam:
        # CBAM paper, Fig. 3: on the residual branch, before the addition.
        x = CBAM(init=cbam_init, name=f"{name}_cbam")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _resnet50(inputs, cbam, output_stride=32, cbam_init="identity"):
    x = ImageNetPreprocessing(name="preprocess")(inputs)
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = FusedBatchNormalization(epsilon=_BN_EPSILON, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    taps = {"P1": x}
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    dilations = RESNET_DILATIONS[output_stride]
    for stage, (filters, blocks, stride) in enumerate(
        [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=2
    ):
        dilation = dilations.get(stage, 1)
        if dilation > 1:
            stride = 1  # a dilated stage keeps its input's resolution
        for block in range(1, blocks + 1):
            x = _bottleneck(
                x,
                filters,
                stride=stride if block == 1 else 1,
                conv_shortcut=block == 1,
                cbam=cbam,
                name=f"conv{stage}_block{block}",
                dilation=dilation,
                cbam_init=cbam_init,
            )
        taps[f"P{stage}"] = x
    return taps


# output stride -> {ResNet stage: dilation rate of its 3x3 convolutions}, as DeepLab
# (Chen et al. 2017) and PSPNet (Zhao et al. 2017): a dilated stage has stride 1 and
# dilation 2 (conv4) or 4 (conv5, after a dilated conv4).
RESNET_DILATIONS = {8: {4: 2, 5: 4}, 16: {5: 2}, 32: {}}
# The output strides each backbone can be built at. VGG16 has no residual stages to
# dilate; its pools are part of the published architecture, so rmib builds it as is.
OUTPUT_STRIDES = {"resnet50": choices.OUTPUT_STRIDES, "vgg16": (32,)}

# name -> (builder, keras.applications ImageNet "notop" file, its md5, its URL folder)
_BACKBONES = {
    "vgg16": (
        _vgg16,
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/",
    ),
    "resnet50": (
        _resnet50,
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
    ),
}
BACKBONES = choices.BACKBONES
assert BACKBONES == tuple(sorted(_BACKBONES)), "choices.BACKBONES are the table's"
_WEIGHTS_HOST = "storage.googleapis.com"


def build_backbone(
    name,
    cbam=False,
    input_shape=(None, None, 3),
    weights=None,
    model_name=None,
    output_stride=32,
    cbam_init="identity",
):
    """A VGG16 or ResNet50 feature extractor whose outputs are named skip taps.

    Inputs are RGB images with values in [0, 255]; the keras.applications "caffe"
    preprocessing (RGB -> BGR, ImageNet mean subtracted) is the model's first layer.
    Outputs are a dict of feature maps by stride: "Pk" is at stride 2**k, except that
    at an `output_stride` below 32 the taps of dilated stages keep the stride of the
    last strided one (`tap_strides` gives the real strides). VGG16: "P0"
    (block1, full resolution) to "P4" (block5 before pooling, after CBAM where
    present) and "P5" (block5_pool). ResNet50: "P1" conv1_relu, "P2" conv2_block3_out,
    "P3" conv3_block4_out, "P4" conv4_block6_out, "P5" conv5_block3_out.
    With `cbam=True` a CBAM (Woo et al., ECCV 2018) follows the last conv of every
    VGG block (before its pooling) and the last BN of every ResNet bottleneck (before
    the residual addition), named e.g. "block1_cbam", "conv2_block1_cbam".

    Args:
        name: one of `BACKBONES` ("resnet50", "vgg16").
        cbam: insert CBAM modules.
        input_shape: (height, width, 3); None sides accept any size (a multiple of 32
            keeps every tap aligned with the input).
        weights: None or "none" (random initialisation), "imagenet" (the
            keras.applications files, from the Keras cache or downloaded), or the path
            of a `.h5` file (loaded by layer name, e.g. the keras.applications
            ImageNet files) or of a `.weights.h5` file saved by Keras from the same
            architecture.
        model_name: the model's name; default e.g. "vgg16" or "vgg16_cbam".
        output_stride: stride of the deepest tap. ResNet50: 32 (plain), 16 (conv5
            with stride 1 and dilation 2) or 8 (conv4 and conv5 with stride 1 and
            dilation 2 and 4, the dilated ResNet of DeepLab and PSPNet); VGG16: 32
            only. Dilation changes no weight shape, so the same weights (ImageNet,
            stage-1, a `.weights.h5` file) load at every stride.
        cbam_init: "identity" or "woo", the initialisation of the CBAM modules
            (see `rmib.models.layers.CBAM`).

    Returns:
        A `keras.Model` from images to the dict of taps.

    Raises:
        RmibError: unknown name (the message lists the valid ones); an output stride
            the backbone does not support (listed in `OUTPUT_STRIDES`); ImageNet weights
            requested offline and absent from the Keras cache; weights file missing,
            unreadable, or not matching the architecture.

    Example:
        >>> encoder = build_backbone("resnet50", cbam=True)
        >>> sorted(encoder.output)
        ['P1', 'P2', 'P3', 'P4', 'P5']
    """
    key = str(name).lower()
    if key not in _BACKBONES:
        raise RmibError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    supported = OUTPUT_STRIDES[key]
    if output_stride not in supported:
        raise RmibError(
            f"{key} cannot be built at output_stride {output_stride!r}; "
            f"expected one of {', '.join(map(str, supported))}"
        )
    builder = _BACKBONES[key][0]
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    taps = builder(inputs, cbam, output_stride=int(output_stride), cbam_init=cbam_init)
    model = keras.Model(inputs, taps, name=model_name or (f"{key}_cbam" if cbam else key))
    load_backbone_weights(model, key, weights)
    return model


def backbone_name(model):
    """The table name of a backbone built by rmib, with "_cbam" when it has CBAM.

    Works whatever the model is called now (e.g. "backbone" inside a classifier).

    Raises:
        ValueError: the model is not an rmib backbone.
    """
    names = {layer.name for layer in model.layers}
    if "block1_conv1" in names:
        base = "vgg16"
    elif "conv1_conv" in names and "conv5_block3_out" in names:
        base = "resnet50"
    else:
        raise ValueError(f"model {model.name!r} is not an rmib backbone ({', '.join(BACKBONES)})")
    has_cbam = any(isinstance(layer, CBAM) for layer in model.layers)
    return f"{base}_cbam" if has_cbam else base


def cbam_init_of(model):
    """The `init` of a backbone's (first) CBAM module; "identity" when it has none."""
    return next((layer.init for layer in model.layers if isinstance(layer, CBAM)), "identity")


def _conv_stride(model, layer_name):
    return int(model.get_layer(layer_name).strides[0])


def tap_strides(model):
    """{tap name: real stride} of a backbone built by rmib.

    E.g. {"P1": 2, ..., "P5": 32} for a plain ResNet50, {"P1": 2, "P2": 4, "P3": 8,
    "P4": 8, "P5": 8} for one at output stride 8. Read from the layers themselves,
    so it is right for a model loaded from a file.
    """
    strides = {key: 2 ** int(key[1:]) for key in model.output}
    if backbone_name(model).startswith("resnet50"):
        conv4 = _conv_stride(model, "conv4_block1_1_conv")
        conv5 = _conv_stride(model, "conv5_block1_1_conv")
        strides.update({"P4": 8 * conv4, "P5": 8 * conv4 * conv5})
    return strides


def output_stride(model):
    """The stride of a backbone's deepest tap (8, 16 or 32)."""
    return max(tap_strides(model).values())


def rebuild_at_output_stride(model, stride, model_name=None):
    """A copy of an rmib backbone built at output stride `stride`, with `model`'s weights.

    Dilation changes no weight shape, so every weight is copied by layer name (e.g.
    a stage-1 encoder trained at stride 32 becomes the stride-8 trunk of Dual2Net).
    Returns `model` itself when it already has that stride.

    Raises:
        RmibError: a stride the backbone does not support.
    """
    if output_stride(model) == stride:
        return model
    full_name = backbone_name(model)
    rebuilt = build_backbone(
        full_name.removesuffix("_cbam"),
        cbam=full_name.endswith("_cbam"),
        input_shape=tuple(model.input.shape[1:]),
        model_name=model_name or model.name,
        output_stride=stride,
        cbam_init=cbam_init_of(model),
    )
    for layer in rebuilt.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return rebuilt


def load_backbone_weights(model, name, weights):
    """Load `weights` (None/"none", "imagenet" or a path) into a backbone built by rmib.

    See `build_backbone` for the meaning of `weights`. Returns the model.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return model
    if isinstance(weights, str) and weights.lower() == "imagenet":
        _, file_name, file_hash, folder = _BACKBONES[name]
        path = _imagenet_file(file_name, file_hash, folder)
    else:
        path = Path(weights)
    _load_weights_file(model, path)
    return model


def check_weights(name, weights) -> None:
    """Refuse `weights` that `build_backbone(name, weights=...)` could not load, without
    building the model or downloading anything (commands call it before reading data).

    Checks that "imagenet" is in the Keras cache or can be downloaded, and that a path
    is an existing `.h5` / `.weights.h5` file (a plain `.h5` one a Keras HDF5 weights
    file); whether its layers match the architecture shows when it is loaded.

    Raises:
        RmibError: naming the weights and what was expected.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() in ("", "none")):
        return
    key = str(name).lower()
    if key not in _BACKBONES:
        raise RmibError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if isinstance(weights, str) and weights.lower() == "imagenet":
        file_name = _BACKBONES[key][1]
        if not _cached_imagenet_file(file_name) and not _online(_WEIGHTS_HOST):
            raise RmibError(_offline_message(file_name))
        return
    path = Path(weights)
    _check_weights_file(path)
    if not path.name.endswith(".weights.h5"):
        import h5py

        try:
            with h5py.File(path, "r") as file:
                group = file["model_weights"] if "model_weights" in file else file
                keras_file = "layer_names" in group.attrs
        except OSError as exc:
            raise RmibError(f"{path}: not a readable HDF5 weights file ({exc})") from None
        if not keras_file:
            raise RmibError(
                f"{path}: not a Keras HDF5 weights file (no 'layer_names'); "
                "expected e.g. a keras.applications ImageNet file"
            )


def _keras_cache_dirs():
    # Where keras.utils.get_file caches: $KERAS_HOME, else ~/.keras, else /tmp/.keras.
    homes = [os.environ.get("KERAS_HOME"), "~/.keras", "/tmp/.keras"]
    return [Path(home).expanduser() / "models" for home in homes if home]


def _online(host, timeout=2.0):
    """True when a TCP connection to host:443 opens within `timeout` seconds."""
    result = []

    def attempt():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            pass

    # A thread, because name resolution ignores the socket timeout.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result)


def _cached_imagenet_file(file_name):
    for directory in _keras_cache_dirs():
        if (directory / file_name).is_file():
            return directory / file_name
    return None


def _offline_message(file_name) -> str:
    return (
        f"ImageNet weights ({file_name}) are not in the Keras cache "
        f"({_keras_cache_dirs()[0]}) and cannot be downloaded offline; "
        "pass --weights PATH (a downloaded copy of that file) or --weights none"
    )


def _imagenet_file(file_name, file_hash, folder):
    cached = _cached_imagenet_file(file_name)
    if cached:
        return cached
    if not _online(_WEIGHTS_HOST):
        raise RmibError(_offline_message(file_name))
    try:
        return Path(
            keras.utils.get_file(
                file_name, folder + file_name, cache_subdir="models", file_hash=file_hash
            )
        )
    except Exception as exc:  # network errors come in many types
        raise RmibError(
            f"could not download ImageNet weights {folder + file_name} ({exc}); "
            "pass --weights PATH (a downloaded copy of that file) or --weights none"
        ) from None


def _check_weights_file(path):
    if not path.is_file():
        raise RmibError(
            f"{path}: weights file not found (expected a .h5 or .weights.h5 file, "
            "'imagenet' or 'none')"
        )
    if not path.name.endswith(".weights.h5") and path.suffix.lower() not in (".h5", ".hdf5"):
        raise RmibError(f"{path}: not a weights file (expected a .h5 or .weights.h5 file)")


def _load_weights_file(model, path):
    _check_weights_file(path)
    if path.name.endswith(".weights.h5"):
        try:
            model.load_weights(path)
        except Exception as exc:  # Keras raises ValueError, OSError, KeyError ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RmibError(
                f"{path}: cannot load these weights into {model.name} ({reason}); "
                "a .weights.h5 file must come from the same backbone and cbam setting"
            ) from None
    else:
        _load_h5_by_name(model, path)


def _decode(names):
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _load_h5_by_name(model, path):
    """Load a keras.applications-style HDF5 weights file, matching layers by name."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            group = file["model_weights"] if "model_weights" in file else file
            if "layer_names" not in group.attrs:
                raise RmibError(
                    f"{path}: not a Keras HDF5 weights file (no 'layer_names'); "
                    "expected e.g. a keras.applications ImageNet file"
                )
            stored = {}
            for layer_name in _decode(group.attrs["layer_names"]):
                layer_group = group[layer_name]
                weight_names = _decode(layer_group.attrs.get("weight_names", []))
                stored[layer_name] = [layer_group[w][()] for w in weight_names]
    except RmibError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError ... on bad files
        raise RmibError(f"{path}: not a readable HDF5 weights file ({exc})") from None

    missing = [
        layer.name
        for layer in model.layers
        if layer.weights and not isinstance(layer, CBAM) and not stored.get(layer.name)
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise RmibError(
            f"{path}: has no weights for {len(missing)} layers of {model.name} ({shown}); "
            "is it the file for this backbone?"
        )
    for layer in model.layers:
        # CBAM layers absent from the file (e.g. ImageNet files) keep their initialisation.
        if not layer.weights or layer.name not in stored:
            continue
        values = stored[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        if [tuple(v.shape) for v in values] != expected:
            raise RmibError(
                f"{path}: weights of layer {layer.name} have shapes "
                f"{[tuple(v.shape) for v in values]}, expected {expected}"
            )
        layer.set_weights(values)
