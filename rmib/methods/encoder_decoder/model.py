"""Stage 2 of Ortiz-Feregrino et al.: the lesion segmenter on the classifier's encoder.

The encoder is the stage-1 feature extractor with its weights (the very same layer
object when built from `classifier.get_layer("backbone")`), frozen by default; the
decoder climbs from P5 back to full resolution with skip connections and a residual
addition at the end of each block (Ortiz-Feregrino et al., Fig. 4).
"""

from __future__ import annotations

import keras

from rmib.models.backbones import backbone_name, build_backbone, tap_strides
from rmib.models.layers import FusedBatchNormalization

# PyTorch's default (Keras' 0.99 would need thousands of steps): a lesion segmenter
# trained for a few hundred patch batches must predict with moving statistics that
# have caught up with the decoder's activations.
DECODER_BN_MOMENTUM = 0.9


def _decoder_block(x, skip, filters, name):
    x = keras.layers.UpSampling2D(2, name=f"{name}_upsample")(x)
    if skip is not None:
        x = keras.layers.Concatenate(name=f"{name}_concat")([x, skip])
    # Normalised like a ResNet projection shortcut: VGG features reach the hundreds.
    shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_projection")(x)
    shortcut = FusedBatchNormalization(momentum=DECODER_BN_MOMENTUM, name=f"{name}_projection_bn")(
        shortcut
    )
    for index in (1, 2):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}"
        )(x)
        x = FusedBatchNormalization(momentum=DECODER_BN_MOMENTUM, name=f"{name}_bn{index}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])


def build_encoder_decoder(
    encoder,
    filters=(256, 128, 64, 32, 16),
    freeze_encoder=True,
    name=None,
    cbam=False,
    weights=None,
):
    """Encoder-decoder lesion segmenter (Ortiz-Feregrino et al., stage 2).

    Five decoder blocks, from P5 (stride 32) up to full resolution: upsample x2,
    concatenate the encoder tap of the new stride (none for the last ResNet50 block,
    whose shallowest tap is at stride 2), conv3x3-BN-ReLU twice, plus a 1x1
    projection (+ BN) of the block's input added at the end. A 1x1 conv with a sigmoid gives
    one float32 probability map. Fully convolutional: the input is (None, None, 3),
    RGB in [0, 255], and its height and width must be multiples of
    `required_multiple(model)` (32) so that every skip tap lines up.

    Freezing sets `encoder.trainable = False`; when the encoder is shared with a
    classifier (`classifier.get_layer("backbone")`) that freezes it there too. Frozen
    batch norms run in inference mode. Use `set_encoder_trainable` to fine-tune.

    Args:
        encoder: a backbone `keras.Model` (e.g. `classifier.get_layer("backbone")`,
            shared, not copied) or a name in `BACKBONES`.
        filters: widths of the five decoder blocks, deepest first.
        freeze_encoder: make the encoder's weights non-trainable.
        name: the model's name; default e.g. "vgg16_cbam_encoder_decoder".
        cbam: insert CBAM modules (only when `encoder` is a name).
        weights: encoder weights (only when `encoder` is a name); see `build_backbone`.

    Returns:
        A `keras.Model` from (B, H, W, 3) images to (B, H, W, 1) probabilities.

    Raises:
        RmibError: unknown backbone name, unavailable or bad weights.
        ValueError: wrong number of filters; `cbam`/`weights` with an encoder model.

    Example:
        >>> classifier = build_classifier("vgg16", cbam=True)
        >>> segmenter = build_encoder_decoder(classifier.get_layer("backbone"))
    """
    filters = tuple(int(f) for f in filters)
    if len(filters) != 5:
        raise ValueError(f"filters must give 5 decoder widths (stride 32 -> 1), got {filters}")
    if isinstance(encoder, keras.Model):
        if cbam or str(weights).lower() != "none":
            raise ValueError("cbam and weights apply only when encoder is a name")
    else:
        encoder = build_backbone(encoder, cbam=cbam, weights=weights, model_name="backbone")
    if freeze_encoder:
        encoder.trainable = False

    inputs = keras.Input(shape=(None, None, 3), name="image")
    outputs = decode(encoder(inputs), tap_strides(encoder), filters)
    name = name or f"{backbone_name(encoder)}_encoder_decoder"
    return keras.Model(inputs, outputs, name=name)


def decode(taps, strides, filters=(256, 128, 64, 32, 16)):
    """The decoder of `build_encoder_decoder` on an encoder's taps: the probability map.

    Args:
        taps: {tap name: tensor}, e.g. an rmib backbone's outputs.
        strides: {tap name: stride} (`tap_strides`); stride 32 is where decoding starts.
        filters: widths of the five decoder blocks, deepest first.
    """
    by_stride = {stride: key for key, stride in strides.items()}
    x = taps[by_stride[32]]
    for index, (width, stride) in enumerate(zip(filters, (16, 8, 4, 2, 1), strict=True), start=1):
        skip = taps[by_stride[stride]] if stride in by_stride else None
        x = _decoder_block(x, skip, width, name=f"decoder{index}")
    return keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="segmentation")(x)


def find_encoder(model):
    """The encoder sub-model of a segmenter or classifier: the nested model "backbone"
    or, failing that, its only nested model.

    Raises:
        ValueError: no (or no unique) nested encoder.
    """
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    named = [layer for layer in nested if layer.name == "backbone"]
    if len(named) == 1:
        return named[0]
    if len(nested) == 1:
        return nested[0]
    raise ValueError(f"model {model.name!r} has no unique nested encoder (found {len(nested)})")


def set_encoder_trainable(model, trainable):
    """Freeze (False) or unfreeze (True) the encoder of `model`, e.g. to fine-tune.

    Recompile the model afterwards for the change to reach training.
    Returns the encoder.
    """
    encoder = find_encoder(model)
    encoder.trainable = bool(trainable)
    return encoder


def required_multiple(model):
    """Input height and width must be multiples of this (the encoder's deepest stride).

    Accepts a segmenter, a classifier or a backbone.
    """
    encoder = model if isinstance(model.output, dict) else find_encoder(model)
    return max(tap_strides(encoder).values())
