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
GlobalNet / LocalNet and the fused network. The paper expects other backbones
to help: `build_encoder_unet_trunk` puts the same decoder on a pretrained
encoder (an rmib backbone, e.g. the stage-1 classifier's), over its skip taps.

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
    *,
    encoder=None,
    encoder_name: str | None = None,
    freeze_encoder: bool = False,
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
        encoder: a backbone as the encoder: the trunk is then
            `build_encoder_unet_trunk`'s (any input size; `input_shape` unused).
        encoder_name, freeze_encoder: see `build_encoder_unet_trunk`.

    Returns:
        A `keras.Model` from (B, H, W, 3) to (B, H, W, base_filters).

    Raises:
        ValueError: bad depth or widths (see `unet_filters`), a depth beyond the
            encoder's deepest tap.
    """
    if encoder is not None:
        return build_encoder_unet_trunk(
            encoder, depth, base_filters, max_filters, l2, name, encoder_name, freeze_encoder
        )
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


def encoder_depth(encoder) -> int:
    """The deepest pooling level of a backbone: k of its deepest skip tap "Pk" (5 for rmib's)."""
    return max(int(key[1:]) for key in encoder.output)


def build_encoder_unet_trunk(
    encoder,
    depth: int,
    base_filters: int = DEFAULT_BASE_FILTERS,
    max_filters: int = DEFAULT_MAX_FILTERS,
    l2: float = 0.0,
    name: str = "unet_trunk",
    encoder_name: str | None = None,
    freeze_encoder: bool = False,
):
    """A U-Net trunk whose encoder is a backbone: image -> the decoder's last feature map.

    The encoder path is `encoder` (an rmib backbone, `build_backbone`: RGB in
    [0, 255], its own preprocessing, skip taps "Pk" at stride 2**k) cut after
    its tap "P{depth}", which takes the place of the U-Net's bottleneck; its
    deeper layers are left out. The decoder is `build_unet_trunk`'s: per level,
    from `depth - 1` up to full resolution, a 2x2 transposed convolution to
    the level's width (`unet_filters`), concatenation of the encoder tap of
    the same stride when there is one (ResNet50 has none at full resolution)
    and two conv3x3-BN-ReLU. Height and width must be multiples of 2**depth.

    The cut encoder is a nested sub-model named `encoder_name` that shares
    its layers (and weights) with `encoder`; copy the backbone first when
    two trunks must not share weights.

    Args:
        encoder: a backbone `keras.Model` whose outputs are a dict of taps.
        depth: pooling levels used, 1 to `encoder_depth(encoder)` (5).
        base_filters, max_filters, l2: see `build_unet_trunk` (decoder only).
        name: the trunk's name and the decoder's layer-name prefix.
        encoder_name: the cut encoder's name (default f"{name}_encoder").
        freeze_encoder: make the encoder's weights non-trainable (frozen batch
            norms then run in inference mode).

    Returns:
        A `keras.Model` from (B, H, W, 3) to (B, H, W, base_filters).

    Raises:
        ValueError: depth beyond the encoder's deepest tap, bad widths.

    Example:
        >>> trunk = build_encoder_unet_trunk(build_backbone("vgg16"), 3, base_filters=8)
        >>> tuple(trunk(keras.ops.zeros((1, 64, 64, 3))).shape)
        (1, 64, 64, 8)
    """
    deepest = encoder_depth(encoder)
    depth = int(depth)
    if not 1 <= depth <= deepest:
        raise ValueError(
            f"depth must be 1 to {deepest} (the encoder's deepest tap P{deepest}), got {depth}"
        )
    widths = unet_filters(depth, base_filters, max_filters)
    kept = {key: tap for key, tap in encoder.output.items() if int(key[1:]) <= depth}
    cut = keras.Model(encoder.input, kept, name=encoder_name or f"{name}_encoder")
    if freeze_encoder:
        cut.trainable = False
    inputs = keras.Input(shape=(None, None, 3), name=f"{name}_image")
    taps = cut(inputs)
    x = taps[f"P{depth}"]
    for level in reversed(range(depth)):
        x = keras.layers.Conv2DTranspose(
            widths[level],
            2,
            strides=2,
            kernel_regularizer=_regularizer(l2),
            name=f"{name}_up{level}",
        )(x)
        if f"P{level}" in taps:
            x = keras.layers.Concatenate(name=f"{name}_concat{level}")([taps[f"P{level}"], x])
        x = conv_bn_relu(x, widths[level], f"{name}_dec{level}a", l2)
        x = conv_bn_relu(x, widths[level], f"{name}_dec{level}b", l2)
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
    encoder=None,
    encoder_name: str | None = None,
    freeze_encoder: bool = False,
):
    """A binary-segmentation U-Net (Yan et al. 2019's GlobalNet / LocalNet).

    image (B, H, W, 3) in [0, 255] -> trunk (`build_unet_trunk`: the plain
    U-Net's, or `build_encoder_unet_trunk`'s with `encoder`; nested as a sub-model) ->
    1x1 conv + sigmoid -> (B, H, W, 1) float32 probabilities.

    Args:
        depth, base_filters, max_filters, l2: see `build_unet_trunk`.
        name: the model's name.
        trunk_name: the nested trunk's name (default f"{name}_trunk").
        head_name: the output layer's name (default f"{name}_head").
        input_shape: (height, width, 3); None sides accept any multiple of 2**depth.
        encoder: a backbone as the trunk's encoder (`build_encoder_unet_trunk`);
            None for the plain U-Net.
        encoder_name, freeze_encoder: see `build_encoder_unet_trunk`.

    Returns:
        A `keras.Model`.

    Example:
        >>> model = build_unet(3, base_filters=8)
        >>> tuple(model(keras.ops.zeros((1, 64, 64, 3))).shape)
        (1, 64, 64, 1)
    """
    trunk = build_unet_trunk(
        depth,
        base_filters,
        max_filters,
        l2,
        trunk_name or f"{name}_trunk",
        input_shape,
        encoder=encoder,
        encoder_name=encoder_name,
        freeze_encoder=freeze_encoder,
    )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    outputs = segmentation_head(trunk(inputs), head_name or f"{name}_head", l2)
    return keras.Model(inputs, outputs, name=name)


__all__ = [
    "build_encoder_unet_trunk",
    "build_unet",
    "build_unet_trunk",
    "conv_bn_relu",
    "encoder_depth",
    "segmentation_head",
    "unet_filters",
]
