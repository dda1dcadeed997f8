"""The configuration of the patch-grid DR grader (Yang et al., MICCAI 2017): `rmib grade train`.

What rmib decides where the paper is silent (see also grading/README.md):
the photograph is cropped to its field of view (the paper's "circular region
of interest extraction"), padded to square and resized to 800 px, and Graham
is applied; patch labels come from lesion masks resized with nearest
neighbour (a patch counts as a lesion from `min_pixels` mask pixels, patches
whose only lesion is a soft exudate are left out); normal patches are sampled
down to `normal_per_lesion` per lesion patch; images of a tree's own "test"
split are held out of training for `rmib grade evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from rmib.choices import GRADE_COUNTS
from rmib.config import TrainConfig, check_fields, require
from rmib.data import readers
from rmib.data.augment import AUGMENT_MODES
from rmib.data.pipeline import Preprocessing
from rmib.errors import RmibError
from rmib.methods.grading.nets import VARIANTS
from rmib.methods.grading.patches import PATCH_CLASSES

TASK = "grade"
MODEL_NAME = "yang2017"
LOCAL_FILE = "local_net.keras"
GLOBAL_FILE = "global_net.keras"
PLAIN_FILE = "global_net_plain.keras"
PHASES = {"local": LOCAL_FILE, "global": GLOBAL_FILE, "global_plain": PLAIN_FILE}
GRADE_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
MASK_LESIONS = ("MA", "HE", "EX")  # the local net's lesion classes: images must annotate all three


@dataclasses.dataclass
class GradeConfig:
    """`rmib grade train`: the two-stage grader of Yang et al., MICCAI 2017.

    Attributes:
        data: dataset roots. Patches come from every image annotated with
            masks for all of MA, HE and EX (IDRiD segmentation, DDR lesion
            segmentation, folder-masks); grades from every graded image.
        image_size: side of the square the photograph is padded and resized to (800).
        patch_size: grid patch side h (64 at 800 px; the paper gives none).
        overlap: pixels ov shared by neighbouring patches (32; the paper gives none).
        min_pixels: fewest mask pixels for a patch to count as that lesion.
        grades: 4 (NPDR grades 0-3; grade-4 images left out, as the paper) or 5.
        fov_crop: crop to the field of view before padding to square.
        global_net: "yang" (Table II), "vgg16" or "resnet50".
        global_size: side of the global net's input (256).
        global_weights: backbone weights of "vgg16"/"resnet50": "none",
            "imagenet" or a weights file.
        dropout: dropout after the hidden FC layers of both nets.
        normal_per_lesion: normal patches kept per lesion patch (sampled at
            random; the paper's Table IV is about balanced); 0 keeps them all.
        val_fraction: whole images held out for validation (stratified by
            lesion presence for patches, by grade for the global nets); 0 = none.
        holdout_split: a tree's own split left out of training (for
            `rmib grade evaluate`); "" trains on every image.
        local_augment: augmentation of patches ("rot90": flips and quarter turns).
        augment: augmentation of the global nets' inputs ("free": rotation,
            zoom, flips, noise; the paper rotates, crops and scales).
        baseline: also train the global net on the plain Graham image (the
            paper's "non-weighted" comparison).
        predict_batch: patches per local-net call when building lesion maps.
        cache_dir: keep preprocessed photographs here (memory-mapped), else recompute.
        on_bad: "error" or "skip" for unreadable files.
        local_train: training of the local net (section `[local_train]`); its
            time_limit is 0 or train's.
        train: training of the global nets (section `[train]`); its
            time_limit is the whole run's (every phase together).
    """

    data: list = dataclasses.field(default_factory=list)
    image_size: int = 800
    patch_size: int = 64
    overlap: int = 32
    min_pixels: int = 3
    grades: Literal[GRADE_COUNTS] = 4
    fov_crop: bool = True
    global_net: Literal[VARIANTS] = "yang"
    global_size: int = 256
    global_weights: str = "none"
    dropout: float = 0.5
    normal_per_lesion: float = 1.0
    val_fraction: float = 0.1
    holdout_split: str = "test"
    local_augment: Literal[AUGMENT_MODES] = "rot90"
    augment: Literal[AUGMENT_MODES] = "free"
    baseline: bool = True
    predict_batch: int = 256
    cache_dir: str = ""
    on_bad: Literal[readers.ON_BAD_CHOICES] = "error"
    local_train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=10, batch_size=128, learning_rate=1e-3)
    )
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=16, learning_rate=1e-3)
    )

    def __post_init__(self):
        check_fields(self)
        require(self, "image_size", self.image_size >= 16, "at least 16 pixels")
        require(self, "patch_size", self.patch_size >= 8, "at least 8 pixels")
        require(
            self,
            "patch_size",
            self.patch_size <= self.image_size,
            f"at most image_size ({self.image_size} px)",
        )
        require(
            self,
            "overlap",
            0 <= self.overlap < self.patch_size,
            f"in [0, patch_size) = [0, {self.patch_size}) pixels (smaller than the patch)",
        )
        require(self, "min_pixels", self.min_pixels >= 1, "at least 1")
        require(self, "global_size", self.global_size >= 32, "at least 32 pixels")
        require(
            self,
            "global_weights",
            self.global_net != "yang" or self.global_weights.strip().lower() in ("", "none"),
            "'none' for the yang global net (it has no pretrained weights)",
        )
        require(self, "dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        require(self, "normal_per_lesion", self.normal_per_lesion >= 0, "zero or positive")
        require(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")
        require(self, "predict_batch", self.predict_batch >= 1, "at least 1")
        limits = (self.local_train.time_limit, self.train.time_limit)
        if limits[0] not in (0.0, limits[1]):
            raise RmibError(
                f"local_train.time_limit is {limits[0]:g} min and train.time_limit "
                f"{limits[1]:g}: the time limit is the whole run's; set it in [train] only"
            )

    @property
    def num_classes(self) -> int:
        return int(self.grades)

    def preprocessing(self) -> Preprocessing:
        """Graham on the photograph (FOV-cropped), padded to square and resized to image_size."""
        return Preprocessing(method="graham", fov_crop=self.fov_crop, size=self.image_size)


def grade_metadata(cfg: GradeConfig) -> dict:
    """The rmib.json entries of a grading run (read back by `Grader.load`)."""
    return {
        "task": TASK,
        "model": MODEL_NAME,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "overlap": cfg.overlap,
        "min_pixels": cfg.min_pixels,
        "grades": cfg.num_classes,
        "grade_names": list(GRADE_NAMES[: cfg.num_classes]),
        "patch_classes": list(PATCH_CLASSES),
        "global_net": cfg.global_net,
        "global_size": cfg.global_size,
        "preprocessing": cfg.preprocessing().to_dict(),
        "baseline": cfg.baseline,
        "models": {
            "local": LOCAL_FILE,
            "global": GLOBAL_FILE,
            "global_plain": PLAIN_FILE if cfg.baseline else None,
        },
    }
