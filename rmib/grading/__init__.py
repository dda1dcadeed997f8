"""The patch-grid DR grader of Yang et al., MICCAI 2017 ("Lesion detection and
grading of diabetic retinopathy via two-stage deep convolutional neural networks").

A local network labels the patches of an overlapping grid (normal, MA,
haemorrhage, exudate); the labels and their probabilities form a weighting
matrix M; a global network grades the weighted lesion map I* = (M / 4) * I.
"""

from rmib.grading.global_net import VARIANTS, build_global_net
from rmib.grading.grid import grid_boxes, grid_positions
from rmib.grading.lesion_map import apply_lesion_map, predict_lesion_map, weighted_lesion_map
from rmib.grading.local_net import build_local_net
from rmib.grading.patches import (
    DEFAULT_MIN_PIXELS,
    EXCLUDED,
    PATCH_CLASSES,
    extract_patches,
    iter_patch_batches,
    patch_labels_from_masks,
)

__all__ = [
    "DEFAULT_MIN_PIXELS",
    "EXCLUDED",
    "PATCH_CLASSES",
    "VARIANTS",
    "apply_lesion_map",
    "build_global_net",
    "build_local_net",
    "extract_patches",
    "grid_boxes",
    "grid_positions",
    "iter_patch_batches",
    "patch_labels_from_masks",
    "predict_lesion_map",
    "weighted_lesion_map",
]
