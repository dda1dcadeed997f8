"""The fused local-global U-Net of Yan et al. (ISBI 2019) and its whole-image segmenter.

GlobalNet, a U-Net on the whole photograph resized to `global_size` (640),
gives context; LocalNet, a U-Net on full-resolution patches (256), gives
detail. The fusion module crops the global decoder's last feature map to the
patch's box, resizes it to the patch size, concatenates it to the local
decoder's last feature map and turns the result into the patch's segmentation
with two 3x3 convolutions and one 1x1 convolution. The global output stays
supervised during training; at test time the fused local output is the
segmentation, patch by patch, stitched.

Optionally (`global_encoder` / `local_encoder`), GlobalNet's and/or LocalNet's
encoder is a backbone (VGG16 / ResNet50, with or without CBAM: the stage-1
classifier's of `rmib pretrain`), with the U-Net decoder over its skip taps
(`rmib.models.unet.build_encoder_unet_trunk`); each net gets its own copy
(`copy_backbone`), nested in its trunk as "global_encoder" / "local_encoder".

Boxes are normalised (y0, x0, y1, x1) with respect to the whole (preprocessed)
photograph, edge to edge: a patch whose top-left pixel is (top, left) and whose
side is p in an H x W photograph has the box (top / H, left / W, (top + p) / H,
(left + p) / W), the convention of `rmib.inference.predict_tiled(with_boxes=True)`.

Reference:
    Yan et al., "Learning Mutually Local-Global U-Nets for High-Resolution
    Retinal Lesion Segmentation in Fundus Images", ISBI 2019.
"""

from __future__ import annotations

import functools

import cv2
import keras
import numpy as np
import tensorflow as tf

from rmib.errors import RmibError
from rmib.models.backbones import backbone_name
from rmib.models.unet import (
    DEFAULT_BASE_FILTERS,
    DEFAULT_MAX_FILTERS,
    build_unet,
    build_unet_trunk,
    conv_bn_relu,
    segmentation_head,
)

# Pooling layers per lesion (Yan et al. 2019, section 2.1).
GLOBAL_DEPTHS = {"EX": 6, "HE": 6, "SE": 4, "MA": 3}
LOCAL_DEPTHS = {"EX": 3, "MA": 3, "HE": 6, "SE": 6}
NETWORKS = ("global", "local", "fused")
# The layers of the fused model that phase 3 ("fusion") trains; everything else is frozen.
FUSION_LAYERS = ("fusion_crop", "fusion_concat", "fusion_head")
# A backbone encoder's deepest skip tap is P5 (stride 32): a net on one has at most 5 levels.
BACKBONE_MAX_DEPTH = 5


def default_depths(lesion: str) -> dict:
    """{"global": GlobalNet depth, "local": LocalNet depth} of the paper for a lesion code.

    Raises:
        RmibError: a lesion the paper does not cover (EX, HE, MA, SE).
    """
    if lesion not in GLOBAL_DEPTHS:
        raise RmibError(
            f"no default U-Net depths for lesion {lesion!r}; expected one of "
            f"{', '.join(GLOBAL_DEPTHS)} (or set global_depth and local_depth)"
        )
    return {"global": GLOBAL_DEPTHS[lesion], "local": LOCAL_DEPTHS[lesion]}


def resize_global(image: np.ndarray, size: int) -> np.ndarray:
    """The whole photograph resized to size x size (GlobalNet's input), as the paper does.

    The aspect ratio is not kept (Yan et al. resize 2816 x 3328 to 640 x 640):
    normalised boxes are the same in both. Area interpolation, so that a
    float mask becomes the lesion fraction of each output pixel.
    """
    size = int(size)
    return cv2.resize(np.asarray(image), (size, size), interpolation=cv2.INTER_AREA)


def pad_global_features(features):
    """The global feature maps padded by one edge pixel, as `crop_global_features` reads them.

    Whole-photograph prediction pads the map once and passes it with
    `padded=True` to the crop of every batch of tiles (padding a 640 x 640 x 32
    map costs about as much as cropping a batch of four tiles from it).
    """
    return tf.pad(tf.cast(features, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]], "SYMMETRIC")


def crop_global_features(features, boxes, size, box_indices=None, padded=False):
    """Bilinear crop of a global feature map to patch boxes, at the patch's resolution.

    Output pixel (j, i) of box b is the global map sampled at the centre of
    full-resolution pixel (top + j, left + i), where the global map's pixel k
    covers the k-th of its equal slices of the photograph (so a feature map
    that holds, in channel 0, the normalised y of its pixel centres returns
    exactly the normalised y of each patch pixel's centre). Samples beyond the
    outermost global pixel centres take the edge value, as a half-pixel
    bilinear resize does; boxes reaching past the photograph by more than
    that (a photograph smaller than the patch, padded) read zeros there.
    Uses `tf.image.crop_and_resize` (Keras has no such op) on the map padded
    by one edge pixel.

    Args:
        features: (N, Gh, Gw, C) global feature maps.
        boxes: (B, 4) normalised (y0, x0, y1, x1), edge to edge (module docstring).
        size: (height, width) of the patches (ints or int tensors).
        box_indices: (B,) which map each box reads; default: map b for box b,
            or map 0 for every box when N == 1 (one photograph, many tiles).
        padded: `features` is already `pad_global_features(maps)` (its grid is
            then 2 pixels smaller than its shape); the result is the same.

    Returns:
        (B, height, width, C) tensor in the dtype of `features`.
    """
    features = tf.convert_to_tensor(features)
    dtype = features.dtype
    maps = tf.cast(features, tf.float32)
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    shape = tf.shape(maps)
    border = 2 if padded else 0
    grid_h = tf.cast(shape[1] - border, tf.float32)
    grid_w = tf.cast(shape[2] - border, tf.float32)
    height, width = size
    size_h = tf.cast(height, tf.float32)
    size_w = tf.cast(width, tf.float32)
    y0, x0, y1, x1 = tf.unstack(boxes, axis=-1)
    # Global pixels per patch pixel, then the (pixel-centre) global coordinate
    # of the first and last patch pixel centres.
    step_y = grid_h * (y1 - y0) / size_h
    step_x = grid_w * (x1 - x0) / size_w
    first_y = y0 * grid_h + 0.5 * step_y - 0.5
    first_x = x0 * grid_w + 0.5 * step_x - 0.5
    last_y = first_y + (size_h - 1.0) * step_y
    last_x = first_x + (size_w - 1.0) * step_x
    # crop_and_resize reads normalised coordinate c at c * (side - 1) of the
    # padded map, whose index is the global coordinate + 1.
    if not padded:
        maps = pad_global_features(maps)
    crop_boxes = tf.stack(
        [
            (first_y + 1.0) / (grid_h + 1.0),
            (first_x + 1.0) / (grid_w + 1.0),
            (last_y + 1.0) / (grid_h + 1.0),
            (last_x + 1.0) / (grid_w + 1.0),
        ],
        axis=-1,
    )
    count = tf.shape(boxes)[0]
    if box_indices is None:
        box_indices = tf.where(
            tf.equal(shape[0], 1),
            tf.zeros([count], tf.int32),
            tf.range(count, dtype=tf.int32),
        )
    crops = tf.image.crop_and_resize(
        maps,
        crop_boxes,
        tf.cast(box_indices, tf.int32),
        tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)]),
        method="bilinear",
        extrapolation_value=0.0,
    )
    return tf.cast(crops, dtype)


@keras.saving.register_keras_serializable(package="rmib")
class GlobalFeatureCrop(keras.layers.Layer):
    """The fusion module's crop (Yan et al. 2019, section 2.1 "Feature Fusion").

    Crops the global decoder's last feature map to each patch's box and
    resizes it to the local feature map's size (`crop_global_features`).
    Called on `[global_features (N, Gh, Gw, C), boxes (B, 4), local_features
    (B, H, W, C')]`; returns (B, H, W, C). With N == 1 every box reads the
    same map (one photograph's global features computed once for all its
    tiles); otherwise box b reads map b. No weights.

    Args:
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def call(self, inputs):
        global_features, boxes, local_features = inputs
        local_shape = tf.shape(local_features)
        crops = crop_global_features(global_features, boxes, (local_shape[1], local_shape[2]))
        return tf.cast(crops, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        global_shape, _, local_shape = input_shape
        return (local_shape[0], local_shape[1], local_shape[2], global_shape[-1])


def copy_backbone(source, depth: int | None = None, name: str | None = None):
    """A copy of a backbone's layers, up to its skip tap P{depth}, with their weights.

    The copy has its own variables (fine-tuning it leaves `source`, e.g. the
    stage-1 classifier, alone; GlobalNet and LocalNet each get one), takes any
    input size (a stage-1 encoder trained at 480 x 480 serves GlobalNet and
    LocalNet at theirs) and follows the current dtype policy (the run's
    precision), not the source's. Layers beyond P{depth} are left out, so
    nothing is spent initialising them.

    Args:
        source: an rmib backbone (`build_backbone`), e.g.
            `classifier.get_layer("backbone")` of a `rmib pretrain` model.
        depth: the deepest tap kept (None: all).
        name: the copy's name (default f"{source.name}_copy").

    Returns:
        A `keras.Model` from (B, H, W, 3) images to the taps "Pk", k <= depth,
        whose weights equal `source`'s bit for bit.

    Raises:
        ValueError: `source` is not an rmib backbone, or has no tap that deep.
    """
    backbone_name(source)  # raises ValueError for anything else
    taps = {
        key: tap for key, tap in source.output.items() if depth is None or int(key[1:]) <= depth
    }
    if depth is not None and f"P{depth}" not in taps:
        raise ValueError(
            f"backbone {source.name!r} has no tap P{depth}; it has {sorted(source.output)}"
        )
    cut = keras.Model(source.input, taps)

    def fresh(layer):
        config = layer.get_config()
        config.pop("dtype", None)  # the current dtype policy, not the source run's
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(
        cut, input_tensors=keras.Input(shape=(None, None, 3), name="image"), clone_function=fresh
    )
    for layer in copy.layers:
        if layer.weights:
            layer.set_weights(cut.get_layer(layer.name).get_weights())
    return keras.Model(copy.input, copy.output, name=name or f"{source.name}_copy")


NETS = ("global", "local")


def build_single_net(
    net: str,
    depth: int,
    base_filters: int = DEFAULT_BASE_FILTERS,
    max_filters: int = DEFAULT_MAX_FILTERS,
    l2: float = 0.0,
    encoder=None,
    freeze_encoder: bool = True,
):
    """GlobalNet or LocalNet alone (phase "global" / "local"): a U-Net named "<net>_net".

    Its trunk is "<net>_trunk" and its 1x1 output "<net>_head", the names of
    `build_local_global`, so its weights load into the fused model
    (`copy_matching_weights`). With `encoder` (a backbone, used as is: pass a
    `copy_backbone`), the trunk's encoder is that backbone cut at P{depth},
    nested as "<net>_encoder" and frozen when `freeze_encoder`.

    Raises:
        ValueError: `net` is neither "global" nor "local".
    """
    if net not in NETS:
        raise ValueError(f"net must be one of {', '.join(NETS)}, got {net!r}")
    return build_unet(
        depth,
        base_filters,
        max_filters,
        l2,
        name=f"{net}_net",
        trunk_name=f"{net}_trunk",
        head_name=f"{net}_head",
        encoder=encoder,
        encoder_name=f"{net}_encoder",
        freeze_encoder=freeze_encoder,
    )


# GlobalNet and LocalNet alone: `build_single_net("global" | "local", depth, ...)`.
build_global_net = functools.partial(build_single_net, "global")
build_local_net = functools.partial(build_single_net, "local")


def build_fusion_head(channels: int, filters: int, l2: float = 0.0, name: str = "fusion_head"):
    """Two conv3x3-BN-ReLU and a 1x1 sigmoid conv, on [local, cropped global] features."""
    inputs = keras.Input(shape=(None, None, int(channels)), name=f"{name}_features")
    x = conv_bn_relu(inputs, filters, f"{name}_a", l2)
    x = conv_bn_relu(x, filters, f"{name}_b", l2)
    outputs = segmentation_head(x, f"{name}_out", l2)
    return keras.Model(inputs, outputs, name=name)


def build_local_global(
    global_depth: int,
    local_depth: int,
    base_filters: int = DEFAULT_BASE_FILTERS,
    max_filters: int = DEFAULT_MAX_FILTERS,
    global_size: int = 640,
    fusion_filters: int | None = None,
    l2: float = 0.0,
    name: str = "local_global_unet",
    global_encoder=None,
    local_encoder=None,
    freeze_encoders: bool = True,
):
    """The fused local-global U-Net of Yan et al. (ISBI 2019), Fig. 1.

    Inputs (a dict): "global_image" (B, global_size, global_size, 3), the whole
    photograph resized; "patch" (B, p, p, 3), a full-resolution patch (p a
    multiple of 2**local_depth); "box" (B, 4), the patch's normalised box
    (module docstring). Images are RGB in [0, 255].
    Outputs (a dict, float32): "global" (B, global_size, global_size, 1),
    GlobalNet's segmentation (kept supervised), and "local" (B, p, p, 1), the
    fused segmentation of the patch.

    Sub-models and layers by name: "global_trunk" and "local_trunk" (U-Net
    trunks, `build_unet_trunk`), "global_head" (GlobalNet's 1x1 output),
    "fusion_crop" (`GlobalFeatureCrop`), "fusion_concat", "fusion_head"
    (`build_fusion_head`). Names match `build_global_net` / `build_local_net`,
    so trained single nets load into it (`copy_matching_weights`). With a
    backbone encoder a trunk nests it as "global_encoder" / "local_encoder".

    Args:
        global_depth, local_depth: pooling layers of GlobalNet and LocalNet
            (`default_depths(lesion)` gives the paper's).
        base_filters, max_filters: U-Net widths (`unet_filters`).
        global_size: side of the resized photograph (640 in the paper).
        fusion_filters: width of the fusion convolutions (default base_filters).
        l2: L2 factor on every convolution kernel (the paper's lambda_3); a
            backbone encoder's own regularisers (none in rmib's) are kept.
        name: the model's name.
        global_encoder, local_encoder: a backbone as GlobalNet's / LocalNet's
            encoder, used as is (give each net its own `copy_backbone`); None
            for the plain U-Net. Depth at most `BACKBONE_MAX_DEPTH`.
        freeze_encoders: make the backbone encoders' weights non-trainable.

    Returns:
        A `keras.Model`.

    Raises:
        RmibError: global_size not a multiple of 2**global_depth.
        ValueError: a depth beyond a backbone encoder's deepest tap.
    """
    global_size = int(global_size)
    if global_size % 2 ** int(global_depth):
        raise RmibError(
            f"global_size must be a multiple of 2**global_depth = {2 ** int(global_depth)}, "
            f"got {global_size}"
        )
    fusion_filters = int(fusion_filters or base_filters)
    # The trunks of `build_single_net`'s nets, by the same names: their weights move across.
    global_trunk, local_trunk = (
        build_unet_trunk(
            depth,
            base_filters,
            max_filters,
            l2,
            f"{net}_trunk",
            encoder=encoder,
            encoder_name=f"{net}_encoder",
            freeze_encoder=freeze_encoders,
        )
        for net, depth, encoder in (
            ("global", global_depth, global_encoder),
            ("local", local_depth, local_encoder),
        )
    )
    global_image = keras.Input(shape=(global_size, global_size, 3), name="global_image")
    patch = keras.Input(shape=(None, None, 3), name="patch")
    box = keras.Input(shape=(4,), name="box")
    global_features = global_trunk(global_image)
    global_output = segmentation_head(global_features, "global_head", l2)
    local_features = local_trunk(patch)
    cropped = GlobalFeatureCrop(name="fusion_crop")([global_features, box, local_features])
    fused = keras.layers.Concatenate(name="fusion_concat")([local_features, cropped])
    head = build_fusion_head(
        local_features.shape[-1] + global_features.shape[-1], fusion_filters, l2
    )
    local_output = head(fused)
    return keras.Model(
        {"global_image": global_image, "patch": patch, "box": box},
        {"global": global_output, "local": local_output},
        name=name,
    )


def backbone_encoders(model) -> dict:
    """{"global": encoder, "local": encoder} of the nets of `model` that have a backbone encoder.

    Works on the fused model, GlobalNet and LocalNet alone (an empty dict for plain U-Nets).
    """
    found = {}
    for net in ("global", "local"):
        try:
            trunk = model.get_layer(f"{net}_trunk")
            found[net] = trunk.get_layer(f"{net}_encoder")
        except ValueError:
            continue
    return found


def set_fusion_only_trainable(model, fusion_only: bool = True, freeze_encoders: bool = False):
    """Freeze everything before the fusion module (phase "fusion") or unfreeze all ("joint").

    `freeze_encoders` keeps backbone encoders frozen in either case (a frozen
    stage-1 encoder stays frozen in phase "joint"). Frozen batch norms run in
    inference mode. Recompile afterwards. Returns the model.
    """
    for layer in model.layers:
        layer.trainable = (not fusion_only) or layer.name in FUSION_LAYERS
    if freeze_encoders:
        for encoder in backbone_encoders(model).values():
            encoder.trainable = False
    return model


def _weights_by_place(model, prefix: str = "") -> dict:
    """{(nested layer names, index): weight}: where each weight sits in the layer tree.

    Unlike `weight.path` (the bare layer name, e.g. "block1_conv1/kernel"),
    this tells apart the layers of two nested backbones that share layer names.
    """
    places = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            places.update(_weights_by_place(layer, f"{prefix}{layer.name}/"))
            continue
        for index, weight in enumerate(layer.weights):
            places[(f"{prefix}{layer.name}", index)] = weight
    return places


def copy_matching_weights(source, target) -> int:
    """Copy every weight of `source` into the `target` weight at the same place and shape.

    The place of a weight is its chain of (nested) layer names, e.g.
    "local_trunk/local_encoder/block1_conv1" kernel, so trained GlobalNet /
    LocalNet trunks move into the fused model and back whatever the model
    around them. Returns the number of weights copied.
    """
    values = _weights_by_place(source)
    copied = 0
    for place, weight in _weights_by_place(target).items():
        match = values.get(place)
        if match is not None and tuple(match.shape) == tuple(weight.shape):
            weight.assign(match)
            copied += 1
    return copied
