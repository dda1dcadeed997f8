"""Dual2Net: a dual-branch segmenter trained with the dual-sampling modulated (DSM) Dice loss.

Reference: "Dual-branch network with dual-sampling modulated Dice loss for hard
exudate segmentation in colour fundus images" (the DSM Dice paper), and its
authors' code where the printed equations differ (see DESIGN.md "Dual2Net").

What is shared and what is not (the paper's section 3.2, on any rmib encoder):

    image -> trunk (shared) -> "features" -> large branch: last encoder block + head -> p_large
                            |             -> small branch: last encoder block + head -> p_small
                            -> "aux"      -> large aux head -> a_large
                                          -> small aux head -> a_small

- trunk: every layer of the encoder up to the input of its last block
  (ResNet50: through `conv5_block2_out`; VGG16: through `block5_conv2`), plus
  the auxiliary tap, the output of the encoder's penultimate stage (ResNet50
  P4 = conv4 = PSPNet's `layer3`, which carries PSPNet's auxiliary loss;
  VGG16 P3 = block4), and for the "decoder" head the skip taps. One set of
  weights, used by both branches.
- per branch (two independent copies): the encoder's last block (ResNet50
  `conv5_block3` bottleneck, with its CBAM when the encoder has CBAM; VGG16
  `block5_conv3` and `block5_cbam`), built fresh with the encoder's
  architecture and layer names and initialised with the encoder's weights for
  that block (ImageNet, stage-1 or random, the same in both copies); then the
  head: "ppm" (PSPNet's pyramid pooling module, bins 1, 2, 3, 6, each bin
  normalised by GroupNorm with one group as the authors' code, then
  conv3x3-BN-ReLU-dropout 0.1 and a 1x1 classifier) or "decoder" (upsampling
  blocks with the trunk's skip taps); logits are upsampled bilinearly to the
  input size and a sigmoid gives a float32 probability map.
- per branch: an auxiliary head on the aux tap (conv3x3 256-BN-ReLU-dropout
  0.1, 1x1 classifier, bilinear upsampling, sigmoid), used only in training.

The encoder is rebuilt at `output_stride` (its weights copied: dilation changes
no weight shape). ResNet50 defaults to 8, the paper's dilated backbone (conv4
dilation 2, conv5 dilation 4, as PSPNet): the branch features of a 960x1440
photograph are 120x180, and each branch's copy of conv5_block3 keeps conv5's
dilation. Stride 32 (the plain ResNet50, 30x45 features) stays available.
VGG16 exists only at stride 32 (its last block then works at stride 16). The
"decoder" head upsamples only where a skip tap is finer than its input.

Training (`Dual2Net.train_step`): every step takes two independently drawn
batches, ((x_large, x_small), (y_large, y_small, counts_small)); both go
through the shared trunk in one call (BN statistics are pooled over the two
batches), each half then through its own branch:

    L = alpha * Dice(y_large, p_large) + (1 - alpha) * SampledDice(y_small, p_small, counts)
        + aux_weight * (Dice(y_large, a_large) + Dice(y_small, a_small))

(both auxiliary terms the plain Dice on the full label, eqs. 7-8), with `counts` the re-balanced pixel sample (`rmib.losses.sample_rebalanced_pixels`,
drawn in the data pipeline) and alpha = 1 - (epoch / epochs)^2 held in the
non-trainable variable `dsm_alpha` that `DSMAlphaSchedule` sets at every
epoch's start. The single-branch variants of the paper's ablation (Table 4)
have one branch and one aux head trained on (x, y) with plain Dice ("dice")
or class-balanced cross-entropy ("bce", `rmib.losses.weighted_bce` with gamma 1).
Inference: the mean of the branches' probability maps (`call`, `inference_model`).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from rmib import losses as losses_lib
from rmib.choices import DUAL2NET_HEADS as HEADS
from rmib.methods.dual2net.layers import PPM_BINS, BilinearUpsampling, PyramidPooling
from rmib.methods.dual2net.loss import AUX_WEIGHT, _single_loss, dual2net_loss
from rmib.models.backbones import (
    RESNET_DILATIONS,
    backbone_name,
    build_backbone,
    cbam_init_of,
    rebuild_at_output_stride,
    tap_strides,
)
from rmib.models.backbones import _bottleneck as resnet_bottleneck
from rmib.models.backbones import output_stride as backbone_output_stride
from rmib.models.layers import CBAM, FusedBatchNormalization

LOSS_VARIANTS = ("dsm", "dice", "bce")
SIZE_MULTIPLE = 32  # inputs must be multiples of the encoders' deepest stride
_BN_EPSILON = 1.001e-5  # keras.applications ResNet50's value, as in rmib's backbones
_CLASSIFIER_INIT = {"class_name": "RandomNormal", "config": {"mean": 0.0, "stddev": 0.01}}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where an rmib encoder is cut (see the module docstring)."""

    trunk_output: str  # layer whose output is the input of the last block
    aux_tap: str  # penultimate stage's tap: the auxiliary heads' input
    feature_tap: str  # the tap at the last block's stride
    skips: tuple  # decoder skip taps, deepest first


_LAYOUTS = {
    "resnet50": _Layout("conv5_block2_out", "P4", "P5", ("P4", "P3", "P2", "P1")),
    "vgg16": _Layout("block5_conv2", "P3", "P4", ("P3", "P2", "P1", "P0")),
}


# The paper's backbone: ResNet50 dilated to output stride 8, as PSPNet. VGG16 exists
# only at stride 32 (its last block then works at stride 16).
PAPER_OUTPUT_STRIDE = {"resnet50": 8, "vgg16": 32}
_DECODER_FILTERS = (256, 128, 64, 32)


def _last_block(x, base, cbam_init, dilation):
    """The encoder's last block; `cbam_init` is its CBAM modules' init, None without CBAM."""
    cbam = cbam_init is not None
    if base == "resnet50":
        return resnet_bottleneck(
            x, 512, 1, False, cbam, "conv5_block3", dilation=dilation, cbam_init=cbam_init
        )
    x = keras.layers.Conv2D(512, 3, activation="relu", padding="same", name="block5_conv3")(x)
    return CBAM(init=cbam_init, name="block5_cbam")(x) if cbam else x


def _conv_bn_relu(x, filters, kernel, name):
    x = keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = FusedBatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _classifier(x, stride, name):
    """1x1 classifier, bilinear upsampling of the logits by `stride`, float32 sigmoid."""
    x = keras.layers.Conv2D(1, 1, kernel_initializer=_CLASSIFIER_INIT, name=f"{name}_classifier")(x)
    if stride > 1:
        x = BilinearUpsampling(stride, name=f"{name}_upsample")(x)
    return keras.layers.Activation("sigmoid", dtype="float32", name=f"{name}_probability")(x)


def _decoder_block(x, skip, filters, factor, name):
    if factor > 1:
        x = BilinearUpsampling(factor, name=f"{name}_upsample")(x)
    x = keras.layers.Concatenate(name=f"{name}_concat")([x, skip])
    shortcut = keras.layers.Conv2D(filters, 1, name=f"{name}_projection")(x)
    x = _conv_bn_relu(x, filters, 3, f"{name}_1")
    x = _conv_bn_relu(x, filters, 3, f"{name}_2")
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])


def _build_branch(
    layout, base, cbam_init, head, channels, strides, dilation, head_filters, dropout, name
):
    """One branch: the encoder's last block + the head, trunk features -> probabilities."""
    inputs = {
        "features": keras.Input((None, None, channels["features"]), name="features"),
    }
    x = _last_block(inputs["features"], base, cbam_init, dilation)
    stride = strides[layout.feature_tap]
    if head == "ppm":
        x = PyramidPooling(PPM_BINS, name="ppm")(x)
        x = _conv_bn_relu(x, head_filters, 3, "head")
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    else:
        for index, (tap, filters) in enumerate(
            zip(layout.skips, _DECODER_FILTERS, strict=True), start=1
        ):
            inputs[tap] = keras.Input((None, None, channels[tap]), name=tap)
            # A skip of a dilated stage is at the features' stride: no upsampling.
            x = _decoder_block(x, inputs[tap], filters, stride // strides[tap], f"decoder{index}")
            stride = strides[tap]
    outputs = _classifier(x, stride, "segmentation")
    return keras.Model(inputs, outputs, name=name)


def _build_aux_head(layout, channels, stride, dropout, name):
    inputs = keras.Input((None, None, channels), name="aux")
    x = _conv_bn_relu(inputs, 256, 3, "aux")
    x = keras.layers.Dropout(dropout, name="aux_dropout")(x)
    outputs = _classifier(x, stride, "aux")
    return keras.Model(inputs, outputs, name=name)


def _build_trunk(encoder, layout, head):
    taps = encoder.output
    outputs = {
        "features": encoder.get_layer(layout.trunk_output).output,
        "aux": taps[layout.aux_tap],
    }
    if head == "decoder":
        outputs.update({tap: taps[tap] for tap in layout.skips})
    return keras.Model(encoder.input, outputs, name="trunk")


def _copy_last_block(encoder, branch):
    """Give the branch's copy of the last block the encoder's weights (by layer name)."""
    names = {layer.name for layer in encoder.layers}
    copied = 0
    for layer in branch.layers:
        if layer.weights and layer.name in names:
            layer.set_weights(encoder.get_layer(layer.name).get_weights())
            copied += 1
    if not copied:
        raise ValueError(f"no layer of {branch.name} matches a layer of {encoder.name}")


def _select(features: dict, model) -> dict | object:
    """The trunk outputs a branch takes, keyed exactly as its inputs (Keras maps
    mismatched dicts by position, not by name)."""
    wanted = model.input
    if isinstance(wanted, dict):
        return {key: features[key] for key in wanted}
    return features["aux"]


@keras.saving.register_keras_serializable(package="rmib")
class Dual2Net(keras.Model):
    """Dual2Net (or one of its single-branch ablations) with its own training step.

    Build it with `build_dual2net`. `call(images)` is inference: the mean of
    the branches' probability maps, (B, H, W, 1) float32 for (B, H, W, 3) RGB
    images in [0, 255] whose sides are multiples of 32. `train_step` expects
    ((x_large, x_small), (y_large, y_small, counts_small)) for the "dsm" loss
    and (x, y) for "dice" and "bce"; `test_step` expects (x, y) and logs
    "loss", the Dice loss of the mean map (rmib validates on whole photographs
    through `Dual2NetSegmenter` instead). `inference_model()` is the plain functional model
    image -> mean probability (the trunk and branches, without aux heads),
    which is what a run saves as `model.keras`.

    Args:
        trunk: the shared trunk, image -> {"features", "aux", skip taps}.
        branches: one or two branch models (large first), trunk outputs -> probabilities.
        aux_heads: one auxiliary head per branch, aux tap -> probabilities.
        loss: "dsm" (two branches), "dice" or "bce" (one branch).
        aux_weight: weight of the auxiliary losses (0.4).
        **kwargs: `keras.Model` arguments (name, ...).
    """

    def __init__(self, trunk, branches, aux_heads, loss="dsm", aux_weight=AUX_WEIGHT, **kwargs):
        super().__init__(**kwargs)
        if loss not in LOSS_VARIANTS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_VARIANTS)}, got {loss!r}")
        branches, aux_heads = list(branches), list(aux_heads)
        expected = 2 if loss == "dsm" else 1
        if len(branches) != expected or len(aux_heads) != expected:
            raise ValueError(
                f"loss {loss!r} needs {expected} branch(es) and aux head(s), got "
                f"{len(branches)} and {len(aux_heads)}"
            )
        self.trunk = trunk
        self.branches = branches
        self.aux_heads = aux_heads
        self.loss_variant = loss
        self.aux_weight = float(aux_weight)
        self.dsm_alpha = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="dsm_alpha"
        )
        names = (
            ("loss", "dice_large", "dice_small", "aux_large", "aux_small", "dsm_alpha")
            if loss == "dsm"
            else ("loss", "branch_loss", "aux_loss")
        )
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        features = self.trunk(inputs, training=training)
        maps = [branch(_select(features, branch), training=training) for branch in self.branches]
        if len(maps) == 1:
            return maps[0]
        return ops.mean(ops.stack(maps, axis=0), axis=0)

    def _replicas(self):
        return tf.distribute.get_strategy().num_replicas_in_sync

    def compute_losses(self, data, training=True):
        """The training loss and its logged terms for one batch of `train_step`'s data."""
        x, y = data[0], data[1]
        if self.loss_variant == "dsm":
            (x_large, x_small), (y_large, y_small, counts) = x, y
            size = ops.shape(x_large)[0]
            features = self.trunk(ops.concatenate([x_large, x_small], axis=0), training=training)
            large = {k: v[:size] for k, v in features.items()}
            small = {k: v[size:] for k, v in features.items()}
            (large_branch, small_branch), (large_aux, small_aux) = self.branches, self.aux_heads
            total, terms = dual2net_loss(
                self.dsm_alpha,
                y_large,
                large_branch(_select(large, large_branch), training=training),
                large_aux(large["aux"], training=training),
                y_small,
                small_branch(_select(small, small_branch), training=training),
                small_aux(small["aux"], training=training),
                counts,
                aux_weight=self.aux_weight,
            )
            terms["dsm_alpha"] = ops.cast(self.dsm_alpha, "float32")
        else:
            loss_fn = _single_loss(self.loss_variant)
            features = self.trunk(x, training=training)
            (branch,), (aux,) = self.branches, self.aux_heads
            terms = {
                "branch_loss": loss_fn(y, branch(_select(features, branch), training=training)),
                "aux_loss": loss_fn(y, aux(features["aux"], training=training)),
            }
            total = terms["branch_loss"] + self.aux_weight * terms["aux_loss"]
        if self.losses:
            total = total + ops.cast(ops.sum(ops.stack(self.losses)), "float32")
        return total, terms

    def make_train_function(self, force=False):
        # Build the optimizer's variables now: created during the first trace,
        # they would make TensorFlow trace the whole training step twice.
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def train_step(self, data):
        with tf.GradientTape() as tape:
            total, terms = self.compute_losses(data, training=True)
            # Gradients are summed over replicas: each replica's share of the mean.
            scaled = self.optimizer.scale_loss(total / self._replicas())
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        self.trackers["loss"].update_state(total)
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def test_step(self, data):
        x, y = data[0], data[1]
        self.trackers["loss"].update_state(losses_lib.dice_loss(y, self(x, training=False)))
        return {"loss": self.trackers["loss"].result()}

    def inference_model(self, name=None):
        """image (B, H, W, 3) -> mean probability (B, H, W, 1): trunk and branches only,
        sharing this model's weights."""
        inputs = keras.Input((None, None, 3), name="image")
        features = self.trunk(inputs)
        maps = [branch(_select(features, branch)) for branch in self.branches]
        if len(maps) == 1:
            outputs = keras.layers.Identity(dtype="float32", name="probability")(maps[0])
        else:
            outputs = keras.layers.Average(dtype="float32", name="probability")(maps)
        return keras.Model(inputs, outputs, name=name or f"{self.name}_inference")

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "trunk": keras.saving.serialize_keras_object(self.trunk),
            "branches": [keras.saving.serialize_keras_object(b) for b in self.branches],
            "aux_heads": [keras.saving.serialize_keras_object(a) for a in self.aux_heads],
            "loss": self.loss_variant,
            "aux_weight": self.aux_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["trunk"] = keras.saving.deserialize_keras_object(config["trunk"])
        for key in ("branches", "aux_heads"):
            config[key] = [keras.saving.deserialize_keras_object(c) for c in config[key]]
        return cls(**config)


def build_dual2net(
    encoder="resnet50",
    *,
    loss="dsm",
    head="ppm",
    cbam=False,
    weights=None,
    freeze_trunk=False,
    aux_weight=AUX_WEIGHT,
    head_filters=512,
    dropout=0.1,
    output_stride=None,
    name=None,
):
    """Dual2Net on an rmib encoder (see the module docstring for what is shared).

    Args:
        encoder: a backbone `keras.Model` from `build_backbone` (e.g. a stage-1
            classifier's `get_layer("backbone")`, whose layers and weights the
            trunk uses as they are), or a name in `BACKBONES`.
        loss: "dsm" (two branches, the DSM Dice loss), "dice" or "bce" (one
            branch: the paper's single-branch ablations).
        head: "ppm" (PSPNet's pyramid pooling, as the paper) or "decoder".
        cbam: insert CBAM (only when `encoder` is a name).
        weights: encoder weights (only when `encoder` is a name): None/"none",
            "imagenet" or a path; see `build_backbone`.
        freeze_trunk: make the shared trunk non-trainable (the branches' copies
            of the last block, the heads and the aux heads stay trainable).
        aux_weight: weight of the auxiliary losses.
        head_filters: channels of the PPM head's 3x3 convolution (512 in PSPNet).
        dropout: dropout rate before the classifiers (0.1 in PSPNet).
        output_stride: the encoder's output stride (see `build_backbone`); None =
            the paper's 8 for ResNet50, 32 (the only one) for VGG16. An encoder
            model built at another stride is rebuilt at this one with its weights.
        name: the model's name; default e.g. "resnet50_dual2net".

    Returns:
        A `Dual2Net` model.

    Raises:
        RmibError: unknown backbone name, unavailable or bad weights, an output
            stride the backbone does not support.
        ValueError: unknown loss or head; `cbam`/`weights` with an encoder model.

    Example:
        >>> model = build_dual2net("vgg16", head="ppm")
        >>> model.inference_model()(keras.ops.zeros((1, 64, 96, 3))).shape
        TensorShape([1, 64, 96, 1])
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if loss not in LOSS_VARIANTS:
        raise ValueError(f"loss must be one of {', '.join(LOSS_VARIANTS)}, got {loss!r}")
    if isinstance(encoder, keras.Model):
        if cbam or (weights is not None and str(weights).lower() != "none"):
            raise ValueError("cbam and weights apply only when encoder is a name")
        base = backbone_name(encoder).removesuffix("_cbam")
        stride = PAPER_OUTPUT_STRIDE[base] if output_stride is None else output_stride
        encoder = rebuild_at_output_stride(encoder, stride)
    else:
        base = str(encoder).lower()
        stride = PAPER_OUTPUT_STRIDE.get(base, 32) if output_stride is None else output_stride
        encoder = build_backbone(
            encoder, cbam=cbam, weights=weights, model_name="backbone", output_stride=stride
        )
    full_name = backbone_name(encoder)
    # The branches' copies of CBAM start as the encoder's (their weights are copied anyway).
    branch_cbam = cbam_init_of(encoder) if full_name.endswith("_cbam") else None
    layout = _LAYOUTS[base]
    strides = tap_strides(encoder)
    dilation = RESNET_DILATIONS[backbone_output_stride(encoder)].get(5, 1)

    trunk = _build_trunk(encoder, layout, head)
    trunk.trainable = not freeze_trunk
    channels = {key: int(tensor.shape[-1]) for key, tensor in trunk.output.items()}
    prefixes = ("large_", "small_") if loss == "dsm" else ("",)
    branches, aux_heads = [], []
    for prefix in prefixes:
        branch = _build_branch(
            layout,
            base,
            branch_cbam,
            head,
            channels,
            strides,
            dilation,
            head_filters,
            dropout,
            f"{prefix}branch",
        )
        _copy_last_block(encoder, branch)
        branches.append(branch)
        aux_heads.append(
            _build_aux_head(
                layout, channels["aux"], strides[layout.aux_tap], dropout, f"{prefix}aux"
            )
        )
    suffix = "dual2net" if loss == "dsm" else f"single_{loss}"
    return Dual2Net(
        trunk,
        branches,
        aux_heads,
        loss=loss,
        aux_weight=aux_weight,
        name=name or f"{full_name}_{suffix}",
    )
