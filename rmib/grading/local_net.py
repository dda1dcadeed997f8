"""The local (patch) network of the two-stage DR grader (Yang et al., MICCAI 2017, Table I)."""

from __future__ import annotations

import keras

from rmib.grading.grid import DEFAULT_PATCH
from rmib.grading.patches import PATCH_CLASSES


def _check_dropout(dropout) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def conv_bn_relu(x, filters: int, name: str):
    """3x3 convolution, stride 1, 'same' padding, then BN before the ReLU (the paper's order)."""
    # No bias: the batch normalisation right after it has its own shift.
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def dense_bn_relu_dropout(x, units: int, dropout: float, name: str):
    """Fully connected layer, BN before the ReLU, then dropout (the paper's order)."""
    x = keras.layers.Dense(units, use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)


def softmax_output(x, num_classes: int):
    # float32 under mixed precision, so the probabilities and losses are float32.
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)


def build_local_net(
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
        >>> model = build_local_net(patch=64)
        >>> model.output_shape
        (None, 4)
    """
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    num_classes = _check_num_classes(num_classes)
    dropout = _check_dropout(dropout)
    inputs = keras.Input((patch, patch, 3), name="patch")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = conv_bn_relu(x, 64, "conv1")
    x = conv_bn_relu(x, 128, "conv2")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = conv_bn_relu(x, 128, "conv3")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = conv_bn_relu(x, 256, "conv4")
    x = keras.layers.Flatten(name="flatten")(x)
    x = dense_bn_relu_dropout(x, 512, dropout, "fc1")
    x = dense_bn_relu_dropout(x, 1024, dropout, "fc2")
    return keras.Model(inputs, softmax_output(x, num_classes), name="yang_local_net")
