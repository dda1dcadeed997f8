"""The U-Net of the fused local-global segmenter (Yan et al., ISBI 2019, section 2.1).

"The encoder is stacked by conv-bn-relu-conv-bn-relu basic blocks. Along the
downsampling path in the encoder, the height and width of the feature map are
halved while the number of channels doubles. The decoder architecture exactly
follows an inverse encoder [...] the feature maps with same spatial size in the
encoder and the decoder are concatenated." The paper gives no base width; rmib
uses 32, doubling per pooling level up to a cap of 512.

A U-Net here is a *trunk* (image -> the decoder's last feature map, the map the
fusion module crops) plus a 1x1 sigmoid *head*; `build_unet` nests the trunk
as a sub-model so that the same trunk (and its weights, by name) moves between
GlobalNet / LocalNet and the fused network.

Reference:
    Yan et al., "Learning Mutually Local-Global U-Nets for High-Resolution
    Retinal Lesion Segmentation in Fundus Images", ISBI 2019.
    Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015.
"""

from __future__ import annotations

import keras

from rmib.models.layers import FusedBatchNormalization

DEFAULT_BASE_FILTERS = 32
DEFAULT_MAX_FILTERS = 512


def unet_filters(depth: int, base_filters: int = DEFAULT_BASE_FILTERS, max_filters=None) -> list:
    """Channels of each U-Net level, from full resolution (level 0) to the bottleneck.

    Level k has `min(base_filters * 2**k, max_filters)` channels; there are
    `depth + 1` levels for `depth` pooling layers.

    Example:
        >>> unet_filters(6, 32, 512)
        [32, 64, 128, 256, 512, 512, 512]

    Raises:
        ValueError: depth < 1, base_filters < 1 or max_filters < base_filters.
    """
    max_filters = DEFAULT_MAX_FILTERS if max_filters is None else int(max_filters)
    depth, base_filters = int(depth), int(base_filters)
    if depth < 1:
        raise ValueError(f"depth (pooling levels) must be at least 1, got {depth}")
    if base_filters < 1:
        raise ValueError(f"base_filters must be at least 1, got {base_filters}")
    if max_filters < base_filters:
        raise ValueError(f"max_filters ({max_filters}) must be >= base_filters ({base_filters})")
    return [min(base_filters * 2**level, max_filters) for level in range(depth + 1)]


def _regularizer(l2: float):
    return keras.regularizers.L2(float(l2)) if l2 else None


def conv_bn_relu(x, filters: int, name: str, l2: float = 0.0, kernel_size: int = 3):
    """Conv (no bias: the batch norm's beta is the bias) -> batch norm -> ReLU."""
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=False,
        kernel_regularizer=_regularizer(l2),
        name=f"{name}_conv",
    )(x)
    x = FusedBatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def build_unet_trunk(
    depth: int,
    base_filters: int = DEFAULT_BASE_FILTERS,
    max_filters: int = DEFAULT_MAX_FILTERS,
    l2: float = 0.0,
    name: str = "unet_trunk",
    input_shape=(None, None, 3),
):
    """A U-Net without its output layer: image -> the decoder's last feature map.

    Input: RGB in [0, 255] (rescaled to [0, 1] by the first layer). Each level
    is two conv3x3-BN-ReLU; the encoder max-pools `depth` times; each decoder
    level upsamples with a 2x2 transposed convolution to the level's width,
    concatenates the encoder map of the same size and applies two
    conv3x3-BN-ReLU. Height and width must be multiples of 2**depth.
    Every layer name starts with `name` so that two trunks can live in one model.

    Args:
        depth: number of pooling layers (Yan et al.: 3 to 6 by lesion).
        base_filters: channels of the full-resolution level (and of the output map).
        max_filters: channel cap of the deeper levels.
        l2: L2 factor on every convolution kernel (0 = none).
        name: the trunk's name and layer-name prefix.
        input_shape: (height, width, 3); None sides accept any multiple of 2**depth.

    Returns:
        A `keras.Model` from (B, H, W, 3) to (B, H, W, base_filters).

    Raises:
        ValueError: bad depth or widths (see `unet_filters`).
    """
    widths = unet_filters(depth, base_filters, max_filters)
    inputs = keras.Input(shape=tuple(input_shape), name=f"{name}_image")
    x = keras.layers.Rescaling(1.0 / 255.0, name=f"{name}_rescale")(inputs)
    skips = []
    for level, width in enumerate(widths[:-1]):
        x = conv_bn_relu(x, width, f"{name}_enc{level}a", l2)
        x = conv_bn_relu(x, width, f"{name}_enc{level}b", l2)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"{name}_pool{level}")(x)
    x = conv_bn_relu(x, widths[-1], f"{name}_bottom_a", l2)
    x = conv_bn_relu(x, widths[-1], f"{name}_bottom_b", l2)
    for level in reversed(range(depth)):
        width = widths[level]
        x = keras.layers.Conv2DTranspose(
            width,
            2,
            strides=2,
            kernel_regularizer=_regularizer(l2),
            name=f"{name}_up{level}",
        )(x)
        x = keras.layers.Concatenate(name=f"{name}_concat{level}")([skips[level], x])
        x = conv_bn_relu(x, width, f"{name}_dec{level}a", l2)
        x = conv_bn_relu(x, width, f"{name}_dec{level}b", l2)
    return keras.Model(inputs, x, name=name)


def segmentation_head(x, name: str, l2: float = 0.0):
    """The 1x1 conv + sigmoid output of a U-Net, in float32 under any precision policy."""
    return keras.layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        kernel_regularizer=_regularizer(l2),
        dtype="float32",
        name=name,
    )(x)


def build_unet(
    depth: int,
    base_filters: int = DEFAULT_BASE_FILTERS,
    max_filters: int = DEFAULT_MAX_FILTERS,
    l2: float = 0.0,
    name: str = "unet",
    trunk_name: str | None = None,
    head_name: str | None = None,
    input_shape=(None, None, 3),
):
    """A binary-segmentation U-Net (Yan et al. 2019's GlobalNet / LocalNet).

    image (B, H, W, 3) in [0, 255] -> trunk (`build_unet_trunk`, nested as a
    sub-model) -> 1x1 conv + sigmoid -> (B, H, W, 1) float32 probabilities.

    Args:
        depth, base_filters, max_filters, l2: see `build_unet_trunk`.
        name: the model's name.
        trunk_name: the nested trunk's name (default f"{name}_trunk").
        head_name: the output layer's name (default f"{name}_head").
        input_shape: (height, width, 3); None sides accept any multiple of 2**depth.

    Returns:
        A `keras.Model`.

    Example:
        >>> model = build_unet(3, base_filters=8)
        >>> tuple(model(keras.ops.zeros((1, 64, 64, 3))).shape)
        (1, 64, 64, 1)
    """
    trunk = build_unet_trunk(
        depth, base_filters, max_filters, l2, trunk_name or f"{name}_trunk", input_shape
    )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    outputs = segmentation_head(trunk(inputs), head_name or f"{name}_head", l2)
    return keras.Model(inputs, outputs, name=name)


__all__ = ["build_unet", "build_unet_trunk", "conv_bn_relu", "segmentation_head", "unet_filters"]
