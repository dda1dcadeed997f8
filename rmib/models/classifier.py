"""Stage 1 of Ortiz-Feregrino et al.: the binary "has a lesion" classifier."""

from __future__ import annotations

import keras

from rmib.models.backbones import backbone_name, build_backbone

HEAD_BN_MOMENTUM = 0.9


def build_classifier(
    backbone,
    cbam=False,
    image_size=480,
    weights=None,
    dense_units=256,
    dropout=0.5,
    l2=1e-4,
    cbam_init="identity",
):
    """Lesion / healthy classifier on a VGG16 or ResNet50 feature extractor.

    image (image_size, image_size, 3) in [0, 255] -> backbone (a nested model named
    "backbone") -> P5 -> global average pooling -> Dense(dense_units, L2) -> BN ->
    ReLU -> Dropout -> Dense(1, sigmoid), the probability that the image shows a
    lesion (DR grade > 0), as in Ortiz-Feregrino et al., "Retinal Lesion Segmentation
    Using Transfer Learning with an Encoder-Decoder CNN" (L2, batch norm and dropout
    in the head). The output is float32 under any precision policy.

    Args:
        backbone: a name in `BACKBONES`, or a backbone `keras.Model` from
            `build_backbone` (renamed "backbone"; used as is, weights included).
        cbam: insert CBAM modules (only when `backbone` is a name).
        image_size: side of the square input.
        weights: backbone weights (only when `backbone` is a name): None/"none",
            "imagenet" or a path; see `build_backbone`.
        dense_units: width of the hidden dense layer.
        dropout: dropout rate after it.
        l2: L2 factor on the hidden dense layer's kernel.
        cbam_init: "identity" (rmib's near-identity gate) or "woo" (the reference
            start), see `rmib.models.layers.CBAM`; stored in each CBAM layer's
            config, so it is kept by save and load.

    Returns:
        A `keras.Model` named e.g. "vgg16_cbam_classifier", output shape (B, 1).

    Raises:
        RmibError: unknown backbone name, unavailable or bad weights.
        ValueError: `cbam` or `weights` given with a backbone model.

    Example:
        >>> model = build_classifier("resnet50", cbam=True, image_size=480)
        >>> encoder = model.get_layer("backbone")  # stage 2 starts from this
    """
    if isinstance(backbone, keras.Model):
        if cbam or str(weights).lower() != "none":
            raise ValueError("cbam and weights apply only when backbone is a name")
        backbone.name = "backbone"
    else:
        backbone = build_backbone(
            backbone, cbam=cbam, weights=weights, model_name="backbone", cbam_init=cbam_init
        )
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    features = backbone(inputs)["P5"]
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    # No bias: the batch norm's beta is the bias.
    x = keras.layers.Dense(
        dense_units,
        use_bias=False,
        kernel_regularizer=keras.regularizers.L2(l2),
        name="head_dense",
    )(x)
    # Momentum 0.9 as the decoders (PyTorch's default): with Keras' 0.99, a stage-1 run
    # of a few dozen steps validated with moving statistics still ~80 % at their
    # initial values (the demo's head: moving mean -24 against a batch mean of -1228),
    # and every validation prediction saturated at 1 (ROC AUC 0.5).
    x = keras.layers.BatchNormalization(momentum=HEAD_BN_MOMENTUM, name="head_bn")(x)
    x = keras.layers.Activation("relu", name="head_relu")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="lesion")(x)
    return keras.Model(inputs, outputs, name=f"{backbone_name(backbone)}_classifier")
