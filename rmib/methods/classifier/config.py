"""The configuration of `rmib pretrain`: the stage-1 classifier's model, data and training."""

from __future__ import annotations

import dataclasses
from typing import Literal

from rmib.choices import AUGMENT, BACKBONES, CBAM_INITS, ON_BAD, PREPROCESSING
from rmib.config import TrainConfig, check_fields, require


@dataclasses.dataclass
class PretrainConfig:
    """`rmib pretrain` settings (a recipe TOML holds the same keys).

    Attributes:
        data: dataset roots with DR grades or lesion/healthy folders.
        backbone: "vgg16" or "resnet50".
        cbam: add CBAM attention after every VGG block / inside every ResNet bottleneck.
        cbam_init: "identity" (near-identity gate, rmib's default) or "woo" (Keras'
            default kernels, zero biases: the reference start); see `rmib.models.CBAM`.
        image_size: input side (480 in the paper).
        weights: "none", "imagenet" (offline: must be in the Keras cache) or a weights file.
        val_fraction: stratified validation split.
        preprocessing: "clahe" (paper), "graham" or "none", after the FOV crop.
        dense_units / dropout / l2: the classification head.
        augment: "free", "rot90" or "none".
        colour_jitter: strength s in [0, 1) of a colour and contrast jitter of
            the training images, after `augment`: brightness +-s x 255, contrast
            and saturation factors in [1 - s, 1 + s]
            (`rmib.data.augment.jitter_colour`). 0 = off.
        threshold: decision threshold of the reported metrics.
        cache_dir: keep preprocessed images here (memory-mapped), else in memory.
        on_bad: "error" or "skip".
        out: the run directory.
    """

    data: list = dataclasses.field(default_factory=list)
    backbone: Literal[BACKBONES] = "vgg16"
    cbam: bool = False
    cbam_init: Literal[CBAM_INITS] = "identity"
    image_size: int = 480
    weights: str = "none"
    val_fraction: float = 0.2
    preprocessing: Literal[PREPROCESSING] = "clahe"
    dense_units: int = 256
    dropout: float = 0.5
    l2: float = 1e-4
    augment: Literal[AUGMENT] = "free"
    colour_jitter: float = 0.0
    threshold: float = 0.5
    cache_dir: str = ""
    on_bad: Literal[ON_BAD] = "error"
    out: str = "runs/pretrain"
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=10, batch_size=4, learning_rate=1e-4, monitor="val_auc", monitor_mode="max"
        )
    )

    def __post_init__(self):
        check_fields(self)
        require(self, "image_size", self.image_size >= 32, "at least 32")
        require(self, "val_fraction", 0.0 < self.val_fraction < 1.0, "in (0, 1)")
        require(self, "dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        require(self, "threshold", 0.0 < self.threshold < 1.0, "in (0, 1)")
        require(self, "colour_jitter", 0.0 <= self.colour_jitter < 1.0, "in [0, 1), e.g. 0.1")
