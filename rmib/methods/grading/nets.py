"""The two networks of the two-stage DR grader (Yang et al., MICCAI 2017).

The local net (Table I) classifies grid patches; the global net (Table II)
grades the weighted lesion map. Both put batch normalisation before every ReLU
and dropout after each hidden fully connected layer. Layer names are those of
the saved `.keras` files: keep them.
"""

from __future__ import annotations

import keras

from rmib.choices import GLOBAL_NETS as VARIANTS
from rmib.errors import RmibError
from rmib.methods.grading.grid import DEFAULT_PATCH
from rmib.methods.grading.patches import PATCH_CLASSES
from rmib.models import build_backbone

# Table II: ten 3x3 convolutions, a 2x2 max-pool after each of the first nine.
GLOBAL_FILTERS = (32, 32, 64, 64, 128, 128, 256, 256, 512, 512)


def _check_dropout(dropout) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _conv_bn_relu(x, filters: int, name: str):
    """3x3 convolution, stride 1, 'same' padding, then BN before the ReLU (the paper's order)."""
    # No bias: the batch normalisation right after it has its own shift.
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _dense_bn_relu_dropout(x, units: int, dropout: float, name: str):
    """Fully connected layer, BN before the ReLU, then dropout (the paper's order)."""
    x = keras.layers.Dense(units, use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)


def _softmax_output(x, num_classes: int):
    # float32 under mixed precision, so the probabilities and losses are float32.
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)


def build_grading_local_net(
    patch: int = DEFAULT_PATCH, num_classes: int = len(PATCH_CLASSES), dropout: float = 0.5
) -> keras.Model:
    """Patch classifier of Yang et al., "Lesion detection and grading of diabetic
    retinopathy via two-stage deep convolutional neural networks", MICCAI 2017, Table I.

    conv 3x3x64, conv 3x3x128, max-pool 2x2/2, conv 3x3x128, max-pool 2x2/2,
    conv 3x3x256, FC 512, FC 1024, softmax. Convolutions have stride 1 and
    'same' padding (the table gives no padding; 'same' keeps a 64 px patch at
    64 -> 32 -> 16 px), pools 'same' padding; batch normalisation before every
    ReLU, dropout after each hidden FC layer. Classes: 0 normal, 1 microaneurysm,
    2 haemorrhage, 3 exudate (`PATCH_CLASSES`).

    Args:
        patch: side of the square RGB input patch, in pixels.
        num_classes: number of patch classes.
        dropout: dropout rate after each hidden FC layer, in [0, 1).

    Returns:
        A `keras.Model` named "yang_local_net" mapping (B, patch, patch, 3)
        images in [0, 255] (rescaled to [0, 1] inside) to float32 softmax
        probabilities (B, num_classes).

    Raises:
        ValueError: patch < 1, num_classes < 2, or dropout outside [0, 1).

    Example:
        >>> model = build_grading_local_net(patch=64)
        >>> model.output_shape
        (None, 4)
    """
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    num_classes = _check_num_classes(num_classes)
    dropout = _check_dropout(dropout)
    inputs = keras.Input((patch, patch, 3), name="patch")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv_bn_relu(x, 64, "conv1")
    x = _conv_bn_relu(x, 128, "conv2")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = _conv_bn_relu(x, 128, "conv3")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = _conv_bn_relu(x, 256, "conv4")
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense_bn_relu_dropout(x, 512, dropout, "fc1")
    x = _dense_bn_relu_dropout(x, 1024, dropout, "fc2")
    return keras.Model(inputs, _softmax_output(x, num_classes), name="yang_local_net")


def build_grading_global_net(
    image_size: int = 256,
    num_classes: int = 4,
    variant: str = "yang",
    dropout: float = 0.5,
    weights: str | None = None,
) -> keras.Model:
    """DR grading network of Yang et al., "Lesion detection and grading of diabetic
    retinopathy via two-stage deep convolutional neural networks", MICCAI 2017, Table II.

    It grades the weighted lesion map I* (`lesion_map.apply_lesion_map`)
    resized to ``image_size``. Variant "yang" is Table II: ten 3x3 convolutions (stride 1,
    'same' padding) of 32, 32, 64, 64, 128, 128, 256, 256, 512, 512 filters,
    a 2x2/2 max-pool after each of the first nine, FC 1024, FC 1024, softmax;
    batch normalisation before every ReLU, dropout after each hidden FC layer.
    Nine poolings of a 256 px input would go below one pixel, so the pools use
    'same' padding and the map bottoms out at 1x1 (256 -> 128 -> ... -> 1 -> 1).
    Variants "vgg16" and "resnet50" replace the convolutions by the rmib
    backbone of that name (its "P5" output), global average pooling, and the
    same FC head.

    Args:
        image_size: side of the square RGB input, in pixels.
        num_classes: 4 NPDR grades as in the paper, or 5 with PDR.
        variant: "yang", "vgg16" or "resnet50".
        dropout: dropout rate after each hidden FC layer, in [0, 1).
        weights: backbone weights for "vgg16"/"resnet50" (passed to
            `rmib.models.build_backbone`: None, "imagenet" or a file); must be
            None (or "none") for "yang".

    Returns:
        A `keras.Model` named "yang_global_net" mapping (B, image_size,
        image_size, 3) images in [0, 255] to float32 softmax probabilities
        (B, num_classes). "yang" rescales them to [0, 1] inside; the backbone
        variants hold the backbone as a nested sub-model named "backbone",
        which applies its own ImageNet preprocessing.

    Raises:
        RmibError: an unknown variant (the message lists the valid ones), or
            weights given for "yang".
        ValueError: image_size < 1, num_classes < 2, or dropout outside [0, 1).
    """
    if variant not in VARIANTS:
        raise RmibError(f"unknown global network variant {variant!r}; expected one of {VARIANTS}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    num_classes = _check_num_classes(num_classes)
    dropout = _check_dropout(dropout)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    if variant == "yang":
        if weights is not None and str(weights).lower() != "none":
            raise RmibError(
                f"the 'yang' global network has no pretrained weights; got weights={weights!r}"
            )
        x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
        for index, filters in enumerate(GLOBAL_FILTERS, start=1):
            x = _conv_bn_relu(x, filters, f"conv{index}")
            if index < len(GLOBAL_FILTERS):
                x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{index}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        backbone = build_backbone(
            variant,
            cbam=False,
            input_shape=(image_size, image_size, 3),
            weights=weights,
            model_name="backbone",
        )
        x = backbone(inputs)["P5"]
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = _dense_bn_relu_dropout(x, 1024, dropout, "fc1")
    x = _dense_bn_relu_dropout(x, 1024, dropout, "fc2")
    return keras.Model(inputs, _softmax_output(x, num_classes), name="yang_global_net")
