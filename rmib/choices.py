"""Every enumerated choice of rmib, declared once.

The config dataclasses type their fields with them (`Literal[choices.X]`,
which `rmib.config` checks), the library checks its arguments against them and
the command line offers them (`click.Choice(choices.X)`);
tests/test_choices.py asserts that every `click.Choice` of the CLI is one of
these tuples. This module imports nothing, so that `rmib --help` stays fast.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- lesions and data

LESIONS = ("EX", "HE", "MA", "SE")
"""The lesion types rmib segments: hard exudates, haemorrhages, microaneurysms, soft exudates."""
MASK_TYPES = LESIONS + ("OD",)
"""Every mask type a reader may attach: the four lesions and the optic disc."""
ON_BAD = ("error", "skip")
"""What a reader does with a bad file: raise at the first one, or skip and list it."""
DATASET_LAYOUTS = (
    "messidor",
    "kaggle",
    "aptos",
    "idrid",
    "idrid-segmentation",
    "idrid-grading",
    "e-ophtha",
    "ddr",
    "ddr-segmentation",
    "ddr-grading",
    "folder",
    "folder-classes",
    "folder-masks",
)
"""Every layout `rmib.data.readers.read_dataset` reads: families and their parts."""
SYNTHETIC_LAYOUTS = (
    "idrid",
    "kaggle",
    "messidor",
    "ddr",
    "aptos",
    "e-ophtha",
    "folder",
    "folder-classes",
)
"""The layouts `rmib.data.synthetic.write_dataset` writes."""
PREPROCESSING = ("none", "clahe", "graham")
"""Photograph preprocessing methods (`rmib.data.fundus.preprocess`)."""
AUGMENT = ("none", "free", "rot90")
"""Augmentation modes of the pretrain and segment recipes."""
AUGMENT_MODES = AUGMENT + ("flip-rot90",)
"""Every mode `rmib.data.augment.augment_pair` accepts ("flip-rot90": an alias of "rot90")."""

# --------------------------------------------------------------------------- models

BACKBONES = ("resnet50", "vgg16")
"""Encoder backbones (`rmib.models.build_backbone`)."""
CBAM_INITS = ("identity", "woo")
"""CBAM's start: a near-identity gate, or Keras' default kernels and zero biases."""
OUTPUT_STRIDES = (8, 16, 32)
"""Encoder output strides a backbone may be built at (ResNet50 all, VGG16 32)."""
SEGMENT_MODELS = ("encoder-decoder", "local-global", "dual2net")
"""Segmentation methods of `rmib segment`."""
SEGMENT_LOSSES = ("bce", "dice", "bce+dice", "weighted-bce")
"""Losses of the encoder-decoder and the local-global U-Net."""
FREEZE_ENCODER = ("auto", "yes", "no")
"""Whether `rmib segment` freezes a transferred encoder."""
LOCAL_GLOBAL_PHASES = ("global", "local", "fusion", "joint")
"""Training phases of the fused local-global U-Net, in order."""
DUAL2NET_VARIANTS = ("dual-dsm", "single-dice", "single-bce")
"""Dual2Net's method and its Table 4 ablation variants."""
DUAL2NET_HEADS = ("ppm", "decoder")
"""Dual2Net's segmentation heads: pyramid pooling (PSPNet) or a decoder."""
GLOBAL_NETS = ("yang", "vgg16", "resnet50")
"""Global networks of the patch-grid grader."""
GRADE_COUNTS = (4, 5)
"""Grades of the patch-grid grader: 4 NPDR grades, or 5 with PDR."""
EVALUATION_SPLITS = ("auto", "all", "train", "valid", "test")
"""Which images `rmib grade evaluate` scores."""

# --------------------------------------------------------------------------- training

OPTIMIZERS = ("adam", "sgd")
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
LR_SCHEDULES = ("constant", "plateau", "poly")
MONITOR_MODES = ("auto", "min", "max")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
"""Training precisions (`rmib.training.resolve_precision`)."""
STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")
"""tf.distribute strategies (`rmib.training.get_strategy`)."""

# --------------------------------------------------------------------------- prediction, export

PREDICT_PRECISIONS = ("float32", "auto", "training", "mixed_bfloat16", "mixed_float16")
"""Precisions of prediction, evaluation and export: a policy name, "auto" (the
machine's fast precision, as for training) or "training" (the run's own)."""
TTA = ("none", "flips", "flips-rot90")
"""Test-time augmentation of whole-image prediction (`rmib.inference.tta`): none; the mean
of the maps of the photograph and its three flips; those and the same turned a quarter."""
EXPORT_FORMATS = ("savedmodel", "keras", "tflite")
"""Formats of `rmib export`."""
REGION_SIGMAS = (0.2, 0.35, 0.5, 0.65, 0.8)
"""Overlap thresholds of the region-level F-score (Dual2Net's)."""
