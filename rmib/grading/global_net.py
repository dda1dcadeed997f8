"""The global (grading) network of the two-stage DR grader (Yang et al., MICCAI 2017, Table II)."""

from __future__ import annotations

import keras

from rmib.choices import GLOBAL_NETS as VARIANTS
from rmib.errors import RmibError
from rmib.grading.local_net import (
    _check_dropout,
    _check_num_classes,
    conv_bn_relu,
    dense_bn_relu_dropout,
    softmax_output,
)
from rmib.models import build_backbone

# Table II: ten 3x3 convolutions, a 2x2 max-pool after each of the first nine.
GLOBAL_FILTERS = (32, 32, 64, 64, 128, 128, 256, 256, 512, 512)


def build_global_net(
    image_size: int = 256,
    num_classes: int = 4,
    variant: str = "yang",
    dropout: float = 0.5,
    weights: str | None = None,
) -> keras.Model:
    """DR grading network of Yang et al., "Lesion detection and grading of diabetic
    retinopathy via two-stage deep convolutional neural networks", MICCAI 2017, Table II.

    It grades the weighted lesion map I* (`apply_lesion_map`) resized to
    ``image_size``. Variant "yang" is Table II: ten 3x3 convolutions (stride 1,
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
            x = conv_bn_relu(x, filters, f"conv{index}")
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
    x = dense_bn_relu_dropout(x, 1024, dropout, "fc1")
    x = dense_bn_relu_dropout(x, 1024, dropout, "fc2")
    return keras.Model(inputs, softmax_output(x, num_classes), name="yang_global_net")
