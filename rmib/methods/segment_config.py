"""The configuration of `rmib segment` (every segmentation method shares it)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from rmib.choices import (
    AUGMENT,
    DUAL2NET_HEADS,
    DUAL2NET_VARIANTS,
    FREEZE_ENCODER,
    LOCAL_GLOBAL_PHASES,
    ON_BAD,
    OUTPUT_STRIDES,
    PREPROCESSING,
    SEGMENT_LOSSES,
    SEGMENT_MODELS,
    TTA,
)
from rmib.choices import LESIONS as LESION_CODES
from rmib.config import TrainConfig, check_fields, require

# The encoder-decoder's backbones (VGG16, ResNet50) halve their input five times.
ENCODER_DECODER_MULTIPLE = 32


@dataclasses.dataclass
class LocalGlobalConfig:
    """Settings of the fused local-global U-Net (section `[local_global]`; Yan et al. 2019).

    Attributes:
        global_size: GlobalNet input (the whole image resized), 640 in the paper.
        base_filters: channels of the first U-Net level (doubling per level up to `max_filters`).
        max_filters: channel cap.
        global_depth / local_depth: pooling levels; 0 = the paper's per-lesion default.
        phases: which of "global", "local", "fusion", "joint" to run, in that
            order (["global"] or ["local"] alone train the paper's ablations).
        epochs_per_phase: overrides the epochs of every phase when > 0.
        lambda_global / lambda_local / lambda_l2: loss weights l1, l2, l3
            (l3 multiplies the squared L2 norm of every convolution kernel).
        centre_crop: IDRiD centre crop 2816x3328 first, applied to each
            photograph at least that large (smaller ones are used whole).
        fusion_epochs / fusion_learning_rate: phase "fusion" (paper: 10, 2e-4);
            phases "global" and "local" use `[train]` (recipes: 2e-4, poly).
        joint_epochs / joint_learning_rate: phase "joint" (paper: 60, 1e-4).
        fusion_filters: width of the fusion convolutions; 0 = base_filters.
        encoder_nets: which nets, of "global" and "local", take the run's
            `encoder` (a stage-1 run or a backbone name) as their encoder, with
            the U-Net decoder over its skip taps (depth at most 5). Empty
            (default): both when `encoder` is a stage-1 run, neither (the
            paper's plain U-Nets) when it is a backbone name; `rmib segment
            --encoder NAME` given on the command line means both.
    """

    global_size: int = 640
    base_filters: int = 32
    max_filters: int = 512
    global_depth: int = 0
    local_depth: int = 0
    phases: list = dataclasses.field(default_factory=lambda: ["global", "local", "fusion", "joint"])
    epochs_per_phase: int = 0
    lambda_global: float = 1.0
    lambda_local: float = 1.0
    lambda_l2: float = 1e-4
    centre_crop: bool = True
    fusion_epochs: int = 10
    fusion_learning_rate: float = 2e-4
    joint_epochs: int = 60
    joint_learning_rate: float = 1e-4
    fusion_filters: int = 0
    encoder_nets: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        check_fields(self)
        require(
            self,
            "encoder_nets",
            all(n in ("global", "local") for n in self.encoder_nets)
            and len(set(self.encoder_nets)) == len(self.encoder_nets),
            'a list of "global" and/or "local", each at most once ([] = the default)',
        )
        order = list(LOCAL_GLOBAL_PHASES)
        require(
            self,
            "phases",
            bool(self.phases)
            and all(p in order for p in self.phases)
            and [order.index(p) for p in self.phases]
            == sorted({order.index(p) for p in self.phases}),
            f"a non-empty list of {', '.join(order)}, each at most once and in that order",
        )
        require(self, "global_size", self.global_size >= 32, "at least 32")
        require(self, "base_filters", self.base_filters >= 1, "at least 1")
        require(self, "max_filters", self.max_filters >= self.base_filters, ">= base_filters")
        for name in ("global_depth", "local_depth"):
            require(self, name, 0 <= getattr(self, name) <= 10, "0 (the paper's) to 10")
        for name in ("lambda_global", "lambda_local", "lambda_l2"):
            require(self, name, getattr(self, name) >= 0, "zero or positive")
        for name in ("epochs_per_phase", "fusion_filters"):
            require(self, name, getattr(self, name) >= 0, "zero or positive")
        for name in ("fusion_epochs", "joint_epochs"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        for name in ("fusion_learning_rate", "joint_learning_rate"):
            require(self, name, getattr(self, name) > 0, "positive")


@dataclasses.dataclass
class Dual2NetConfig:
    """Settings of Dual2Net with the DSM Dice loss (section `[dual2net]`).

    Attributes:
        image_size: [height, width] the whole photograph is resized to (aspect kept,
            zero padding), multiples of 32: 960x1440 for IDRiD, 1024x1024 for DDR.
        pos_fraction: N1/N of the re-balanced pixel sampler of the small-lesion branch.
        aux_weight: weight of the auxiliary heads (0.4).
        head: "ppm" (pyramid pooling, as PSPNet) or "decoder".
        variant: "dual-dsm" (two branches, DSM Dice loss: the paper's method),
            "single-dice" or "single-bce" (one branch with Dice or class-balanced
            cross-entropy: the paper's Table 4 ablation).
        fov_crop: crop the photograph to its field of view's bounding box before
            resizing (the paper's DDR preprocessing; IDRiD is resized directly).
        head_filters: channels of the head's 3x3 convolution (512 in PSPNet).
        output_stride: the encoder's output stride: ResNet50 8 (dilated conv4 and
            conv5, the paper's PSPNet backbone), 16 or 32 (plain); VGG16 32 only.
            Unset: 8 for ResNet50, 32 for VGG16.
    """

    image_size: list = dataclasses.field(default_factory=lambda: [960, 1440])
    pos_fraction: float = 0.5
    aux_weight: float = 0.4
    head: Literal[DUAL2NET_HEADS] = "ppm"
    variant: Literal[DUAL2NET_VARIANTS] = "dual-dsm"
    fov_crop: bool = False
    head_filters: int = 512
    output_stride: int | None = None

    def __post_init__(self):
        check_fields(self)
        require(
            self,
            "output_stride",
            self.output_stride is None or self.output_stride in OUTPUT_STRIDES,
            "8, 16 or 32 (or unset: 8 for ResNet50, 32 for VGG16)",
        )
        require(self, "pos_fraction", 0.0 < self.pos_fraction < 1.0, "in (0, 1)")
        require(self, "aux_weight", self.aux_weight >= 0.0, "zero or positive")
        require(self, "head_filters", self.head_filters >= 1, "at least 1")
        size = self.image_size
        require(
            self,
            "image_size",
            len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
            and all(s >= 32 and s % 32 == 0 for s in size),
            "[height, width], two positive multiples of 32",
        )


@dataclasses.dataclass
class SegmentConfig:
    """`rmib segment`: one binary segmenter for one lesion type.

    Attributes:
        data: dataset roots (any layout with lesion masks). Images of a dataset's
            own test split (IDRiD "b. Testing Set", DDR test) are never trained
            on: they are for `rmib evaluate --split test`.
        lesion: EX, HE, MA or SE.
        model: "encoder-decoder" (RMIB stage 2), "local-global" (Yan et al.) or "dual2net".
        out: the run directory.
        encoder: a stage-1 run directory (its classifier's backbone becomes the
            encoder, frozen), or a backbone name ("vgg16", "resnet50"). The default,
            "vgg16" with weights "none", trains VGG16 from scratch, not the paper's
            transfer; `rmib segment` names the encoder on its first line of output.
        cbam: with a backbone name: add CBAM.
        weights: with a backbone name: "none", "imagenet" or a weights file.
        freeze_encoder: keep the encoder frozen ("auto": frozen when it carries
            trained weights, trainable when built from scratch).
        fine_tune_after: unfreeze the encoder after this many epochs (0 = never),
            at `fine_tune_lr_factor` times the learning rate.
        patch_size: training patch side (160 in the RMIB paper, 256 for LocalNet).
        pos_fraction: fraction of training patches centred on a lesion pixel.
        loss: "bce" (default), "dice", "bce+dice" or "weighted-bce" (eq. 2 of Yan
            et al.). In five short epochs on synthetic exudates with a frozen VGG16
            encoder, bce reached a validation AUPR of 0.85 and weighted-bce 0.91.
        gamma: gamma of weighted-bce.
        val_fraction / val_names: hold out whole images for validation.
        preprocessing: "none", "clahe" or "graham".
        augment: "free", "rot90" or "none".
        colour_jitter: strength s in [0, 1) of a colour and contrast jitter of
            the training patches' images (encoder-decoder only; masks untouched),
            after `augment`: brightness +-s x 255, contrast and saturation
            factors in [1 - s, 1 + s] (`rmib.data.augment.jitter_colour`).
            0 = off.
        scale: working resolution as a fraction of the photograph's, in (0, 1]
            (encoder-decoder only): training photographs and masks are resized
            by it before patches are sampled, and whole photographs are predicted
            at it and the map resized back, so metrics stay at full resolution.
            Stored in the run metadata; predict, evaluate and load_segmenter apply it.
        predict_tile / predict_halo / predict_max_tile / predict_overlap /
            predict_batch: whole-image prediction (`rmib.methods.encoder_decoder.segmenter.TiledSegmenter`):
            "auto" plans tiles of at most predict_max_tile ** 2 pixels over the field
            of view overlapping by 2 * predict_halo pixels; a number is a fixed
            square tile overlapping by the fraction predict_overlap.
        tta: test-time augmentation of whole-image prediction (`rmib.inference.tta`):
            "none", "flips" (4 forward passes) or "flips-rot90" (8; Dual2Net only
            with a square image_size). Applies to the whole-image validation
            during training and, stored in the run metadata when not "none", is
            the default of predict, evaluate and export.
        val_every: compute the whole-image validation metrics every N epochs.
        cache_dir: keep preprocessed images here (memory-mapped), else in memory.
        on_bad: "error" or "skip".
    """

    data: list = dataclasses.field(default_factory=list)
    lesion: Literal[LESION_CODES] = "EX"
    model: Literal[SEGMENT_MODELS] = "encoder-decoder"
    out: str = "runs/segment"
    encoder: str = "vgg16"
    cbam: bool = False
    weights: str = "none"
    freeze_encoder: Literal[FREEZE_ENCODER] = "auto"
    fine_tune_after: int = 0
    fine_tune_lr_factor: float = 0.1
    patch_size: int = 160
    pos_fraction: float = 0.5
    loss: Literal[SEGMENT_LOSSES] = "bce"
    gamma: float = 1.0
    val_fraction: float = 0.2
    val_names: list = dataclasses.field(default_factory=list)
    preprocessing: Literal[PREPROCESSING] = "clahe"
    augment: Literal[AUGMENT] = "free"
    colour_jitter: float = 0.0
    scale: float = 1.0
    patches_per_epoch: int = 512
    predict_tile: Literal["auto"] | int = "auto"
    predict_halo: int = 64
    predict_max_tile: int = 1024
    predict_overlap: float = 0.125
    predict_batch: int = 2
    tta: Literal[TTA] = "none"
    val_every: int = 1
    cache_dir: str = ""
    on_bad: Literal[ON_BAD] = "error"
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=20, batch_size=8, learning_rate=1e-3, monitor="val_aupr", monitor_mode="max"
        )
    )
    local_global: LocalGlobalConfig = dataclasses.field(default_factory=LocalGlobalConfig)
    dual2net: Dual2NetConfig = dataclasses.field(default_factory=Dual2NetConfig)

    def __post_init__(self):
        check_fields(self)
        require(self, "patch_size", self.patch_size >= 32, "at least 32")
        require(self, "pos_fraction", 0.0 <= self.pos_fraction <= 1.0, "in [0, 1]")
        require(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")
        require(self, "fine_tune_after", self.fine_tune_after >= 0, ">= 0")
        require(self, "predict_overlap", 0.0 <= self.predict_overlap < 1.0, "in [0, 1)")
        require(self, "predict_halo", self.predict_halo >= 0, ">= 0")
        require(self, "predict_max_tile", self.predict_max_tile >= 32, "at least 32")
        require(
            self,
            "predict_tile",
            self.predict_tile == "auto"
            or (self.predict_tile > 0 and self.predict_tile % ENCODER_DECODER_MULTIPLE == 0),
            f'"auto" or a multiple of {ENCODER_DECODER_MULTIPLE} (the encoder-decoder\'s '
            "deepest stride)",
        )
        require(self, "val_every", self.val_every >= 1, "at least 1")
        require(self, "scale", 0.0 < self.scale <= 1.0, "in (0, 1], e.g. 0.5")
        require(
            self,
            "scale",
            self.scale == 1.0 or self.model == "encoder-decoder",
            f"1 with --model {self.model} (it sets its own working size: local-global "
            "global_size and full-resolution patches, dual2net image_size); "
            "scale applies to the encoder-decoder",
        )
        require(self, "patches_per_epoch", self.patches_per_epoch >= 1, "at least 1")
        require(self, "colour_jitter", 0.0 <= self.colour_jitter < 1.0, "in [0, 1), e.g. 0.1")
        require(
            self,
            "colour_jitter",
            self.colour_jitter == 0.0 or self.model == "encoder-decoder",
            f"0 with --model {self.model} (its input pipeline has no colour jitter); "
            "colour_jitter applies to the encoder-decoder",
        )
        height, width = self.dual2net.image_size
        require(
            self,
            "tta",
            self.tta != "flips-rot90" or self.model != "dual2net" or height == width,
            f'"none" or "flips" with a {height}x{width} Dual2Net input: quarter turns need a '
            "square --image-size",
        )


def tta_metadata(cfg: SegmentConfig) -> dict:
    """The run metadata of `cfg.tta`: {"tta": ...} when the run chose one, else nothing."""
    return {} if cfg.tta == "none" else {"tta": cfg.tta}
