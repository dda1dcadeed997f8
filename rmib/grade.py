"""Training, prediction and evaluation of the patch-grid DR grader (Yang et al., MICCAI 2017).

"Lesion detection and grading of diabetic retinopathy via two-stage deep
convolutional neural networks": a local network labels the patches of an
overlapping grid (normal, MA, haemorrhage, exudate); the labels and their
probabilities form the weighting matrix M (`rmib.grading.weighted_lesion_map`);
a global network grades I* = (M / 4) * I resized to 256 px. The building
blocks live in `rmib.grading`; this module wires them to datasets, the one
training runner (`rmib.training.fit`) and the run directory.

A grading run directory holds, besides the runner's files (config.toml,
rmib.json, history_<phase>.csv, checkpoints/, metrics.json):

    local_net.keras         the patch classifier (phase "local")
    global_net.keras        the grader of the weighted lesion map I* (phase "global")
    global_net_plain.keras  the same network trained on the plain Graham image
                            (phase "global_plain", the paper's non-weighted baseline)

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

import csv
import dataclasses
import io as _io
import json
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import cv2
import keras
import numpy as np
import tensorflow as tf

from rmib import io, metrics, report
from rmib.choices import EVALUATION_SPLITS, GRADE_COUNTS
from rmib.config import TrainConfig, check_fields, require
from rmib.data import readers
from rmib.data.augment import AUGMENT_MODES, augment_pair, example_seed
from rmib.data.fundus import resize_pad
from rmib.data.pipeline import (
    AUTOTUNE,
    PreprocessedCache,
    Preprocessing,
    epoch_datasets,
    preprocess_array,
    stratified_split,
)
from rmib.errors import BadInputError, RmibError
from rmib.grading import (
    EXCLUDED,
    PATCH_CLASSES,
    VARIANTS,
    build_global_net,
    build_local_net,
    grid_positions,
    iter_patch_batches,
    patch_labels_from_masks,
    weighted_lesion_map,
)
from rmib.grading.lesion_map import MAX_WEIGHT, apply_lesion_map
from rmib.training import (
    RunDirectory,
    fit,
    global_batch_size,
    load_model,
    read_run_metadata,
)

TASK = "grade"
MODEL_NAME = "yang2017"
LOCAL_FILE = "local_net.keras"
GLOBAL_FILE = "global_net.keras"
PLAIN_FILE = "global_net_plain.keras"
PHASES = {"local": LOCAL_FILE, "global": GLOBAL_FILE, "global_plain": PLAIN_FILE}
GRADE_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
MASK_LESIONS = ("MA", "HE", "EX")  # the local net's lesion classes: images must annotate all three
REFERABLE_GRADE = 2  # referable DR: moderate NPDR or worse (Yang et al., Sec. IV-E)
PICTURE_MIN_TILE, PICTURE_MAX_TILE = 256, 512  # panel side in lesion-map pictures
HEAT_COLOUR = (0, 255, 0)  # green stands out on the orange retina
_WORK = "work"  # scratch arrays of a training run (removed when it finishes)


# --------------------------------------------------------------------------- config


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
        local_train: training of the local net (section `[local_train]`).
        train: training of the global nets (section `[train]`).
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


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class GradingData:
    """The records of several dataset trees, sorted by what the grader uses them for.

    Attributes:
        masked: records annotated with masks for all of MA, HE and EX (patch labels).
        graded: records with a DR grade the model can predict.
        left_out_grades: graded records left out because their grade is >= the
            number of grades (grade 4 for a 4-grade model).
        held_out: records left out because they are in the held-out split.
        problems: (path, reason) of every bad file skipped with on_bad="skip".
    """

    masked: list
    graded: list
    left_out_grades: int = 0
    held_out: int = 0
    problems: list = dataclasses.field(default_factory=list)


def _roots_text(roots) -> str:
    return ", ".join(str(r) for r in roots)


def read_grading_data(
    roots, num_classes: int, *, split: str | None = None, exclude_split: str = "", on_bad="error"
) -> GradingData:
    """Read every root and sort its records into masked and graded ones.

    Args:
        roots: dataset folders (any layout `rmib.data.readers` knows).
        num_classes: 4 or 5; graded images of a higher grade are left out.
        split: keep only records of this split (None = all).
        exclude_split: leave out records of this split ("" = none).
        on_bad: "error" or "skip" (bad entries go to `GradingData.problems`).

    Raises:
        RmibError: no roots, or a root that cannot be read.
    """
    roots = [Path(r) for r in roots]
    if not roots:
        raise RmibError("no dataset given: pass --data ROOT (one or more)")
    data = GradingData(masked=[], graded=[])
    for root in roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        data.problems += dataset.problems
        for record in dataset.records:
            if split is not None and record.split != split:
                continue
            if exclude_split and record.split == exclude_split:
                data.held_out += 1
                continue
            if all(record.has_mask(code) for code in MASK_LESIONS):
                data.masked.append(record)
            if record.grade is not None:
                if record.grade < num_classes:
                    data.graded.append(record)
                else:
                    data.left_out_grades += 1
    return data


def no_masks_error(roots, data: GradingData, exclude_split: str = "") -> RmibError:
    held = (
        f" ({data.held_out} images of the held-out {exclude_split!r} split were left out; "
        'set holdout_split = "" to train on them)'
        if data.held_out and exclude_split
        else ""
    )
    return RmibError(
        f"no image in {_roots_text(roots)} has lesion masks for all of MA, HE and EX{held}; "
        "the local net's patch labels come from them. Add a tree with such masks, e.g. IDRiD "
        "'A. Segmentation', DDR 'lesion_segmentation' or a folder with images/ + masks/MA, HE, EX"
    )


def no_grades_error(roots, data: GradingData, num_classes: int) -> RmibError:
    if data.left_out_grades:
        return RmibError(
            f"every graded image in {_roots_text(roots)} ({data.left_out_grades}) has a grade "
            f">= {num_classes}, which a {num_classes}-grade model leaves out; use --grades 5"
        )
    return RmibError(
        f"no graded image in {_roots_text(roots)}; the global net learns DR grades from a "
        "tree that has them: IDRiD 'B. Disease Grading', DDR 'DR_grading', Kaggle/EyePACS "
        "trainLabels.csv, APTOS train.csv or Messidor Annotation_Base*.xls"
    )


def read_masks(record, prep: Preprocessing) -> dict:
    """The record's MA, HE, EX (and SE, if annotated) masks, placed as `prep` places its image.

    Only the geometry of `prep` is applied (FOV crop, pad to square, resize
    with nearest neighbour); the image itself comes from `load_prepared`,
    through the cache.

    Returns:
        lesion code -> (size, size) uint8 0/1.

    Raises:
        BadInputError: an unreadable image or mask, or a mask of the wrong size.
    """
    raw = io.read_image(record.image)
    codes = [c for c in (*MASK_LESIONS, "SE") if record.has_mask(c)]
    arrays = [
        io.read_mask(record.masks[c], expected_shape=raw.shape[:2])
        if record.masks[c] is not None
        else np.zeros(raw.shape[:2], np.uint8)
        for c in codes
    ]
    _, arrays, _ = preprocess_array(raw, dataclasses.replace(prep, method="none"), arrays)
    return dict(zip(codes, arrays, strict=True))


def load_prepared(record, prep: Preprocessing, cache_dir=None) -> np.ndarray:
    """The preprocessed photograph of `record` (through the pipeline cache, not kept in memory)."""
    # A fresh cache per image: with a directory it reads the memory-mapped
    # array from disk; without one nothing accumulates over a large dataset.
    return np.asarray(PreprocessedCache(cache_dir or None).load(record, prep).image)


def _guarded(items: Iterable, load: Callable, on_bad: str, problems: list):
    """Yield (item, load(item)), skipping (with on_bad="skip") the items whose file is bad."""
    for item in items:
        try:
            value = load(item)
        except BadInputError as exc:
            if on_bad != "skip":
                raise
            problems.append((exc.path, exc.reason))
            continue
        yield item, value


def _progress(progress, items, label):
    return progress(items, label) if progress else items


# --------------------------------------------------------------------------- arrays


class _Store:
    """A growing (N, ...) uint8 array on disk (memory-mapped), so large sets stream."""

    def __init__(self, path: Path, capacity: int, shape: tuple):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(max(capacity, 1), *shape)
        )
        self.count = 0

    def append(self, values: np.ndarray) -> None:
        self.array[self.count : self.count + len(values)] = values
        self.count += len(values)

    def result(self) -> np.ndarray:
        self.array.flush()
        return self.array[: self.count]


def balanced_class_weights(labels, num_classes: int) -> dict[int, float]:
    """{class: n / (K_present * n_class)} for every class 0..num_classes-1 (1.0 where absent)."""
    labels = np.asarray(labels).reshape(-1)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    present = int(np.count_nonzero(counts))
    return {
        c: (labels.size / (present * int(k)) if k else 1.0) for c, k in enumerate(counts.tolist())
    }


def array_dataset(
    images,
    labels,
    batch_size: int,
    *,
    augment: str = "none",
    shuffle: bool = True,
    seed: int = 0,
    start_epoch: int = 0,
    epochs: int = 1,
):
    """Batches of (image float32 in [0, 255], int32 label) from uint8 arrays (memory-mapped ok).

    With `shuffle`, the dataset holds epochs `start_epoch`..`epochs` back to
    back, each in its own order and augmentation drawn from (seed, epoch), as
    `rmib.data.pipeline` does; without it, one pass in order (validation).

    Returns:
        (dataset, steps_per_epoch)
    """
    n = len(images)
    steps = max(1, math.ceil(n / batch_size))
    labels = np.asarray(labels, np.int32)

    def generate(epoch):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n) if shuffle else range(n)
        for index in order:
            yield index, np.asarray(images[index]), labels[index]

    signature = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec(tuple(images.shape[1:]), tf.uint8),
        tf.TensorSpec((), tf.int32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, image, label):
            image = tf.cast(image, tf.float32)
            if augment != "none":
                image, _ = augment_pair(
                    image,
                    tf.zeros_like(image[..., :1]),
                    example_seed(seed, epoch, index),
                    mode=augment,
                )
            return image, label

        return ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size)

    if shuffle:
        ds = epoch_datasets(start_epoch, epochs, make_epoch)
    else:  # a known length, so Keras does not take the end of validation for a short input
        ds = make_epoch(0).apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(AUTOTUNE), steps


# --------------------------------------------------------------------------- patches


@dataclasses.dataclass
class PatchSet:
    """Patches for the local net: images (N, h, h, 3) uint8, labels (N,) int32 in 0..3."""

    images: np.ndarray
    labels: np.ndarray
    source_images: int = 0
    excluded: int = 0  # SE-only patches left out

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.labels, minlength=len(PATCH_CLASSES))
        return {name: int(found[i]) for i, name in enumerate(PATCH_CLASSES)}


def build_patch_set(
    records,
    cfg: GradeConfig,
    store_path: Path,
    *,
    seed: int = 0,
    on_bad: str = "error",
    problems: list | None = None,
    progress=None,
    label: str = "Patches",
) -> PatchSet | None:
    """Label the grid of every record from its masks and collect the patches to train on.

    Every lesion patch (label 1-3) is kept; normal patches are sampled at
    random to `cfg.normal_per_lesion` per lesion patch (all with 0); patches
    whose only lesion is a soft exudate (`rmib.grading.EXCLUDED`) are left out.
    Labels come from the masks' geometry alone (no Graham), then the kept
    patches are cut from the preprocessed images, so only they are held.

    Returns:
        The PatchSet, or None when there are no records.
    """
    problems = [] if problems is None else problems
    prep = cfg.preprocessing()
    size, patch, overlap = cfg.image_size, cfg.patch_size, cfg.overlap
    labelled = []
    excluded = 0
    for record, masks in _guarded(
        _progress(progress, records, f"{label}: labelling"),
        lambda r: read_masks(r, prep),
        on_bad,
        problems,
    ):
        labels = patch_labels_from_masks(masks, size, patch, overlap, cfg.min_pixels).reshape(-1)
        excluded += int(np.count_nonzero(labels == EXCLUDED))
        labelled.append((record, labels))
    if not labelled:
        return None
    flat = np.concatenate([labels for _, labels in labelled])
    owner = np.concatenate([np.full(len(labels), i) for i, (_, labels) in enumerate(labelled)])
    lesion = np.flatnonzero(flat > 0)
    normal = np.flatnonzero(flat == 0)
    if cfg.normal_per_lesion > 0:
        wanted = min(normal.size, max(1, round(cfg.normal_per_lesion * lesion.size)))
        normal = np.random.default_rng(seed).choice(normal, size=wanted, replace=False)
    keep = np.sort(np.concatenate([lesion, normal]))
    store = _Store(store_path, keep.size, (patch, patch, 3))
    kept_labels = []
    offsets = np.cumsum([0] + [len(labels) for _, labels in labelled])
    wanted_images = sorted(set(owner[keep].tolist()))
    chosen = [labelled[i] + (i,) for i in wanted_images]
    for (_, labels, i), image in _guarded(
        _progress(progress, chosen, f"{label}: cutting"),
        lambda item: load_prepared(item[0], prep, cfg.cache_dir),
        on_bad,
        problems,
    ):
        cells = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])] - offsets[i]
        batch = next(iter_patch_batches(image, size, patch, overlap, len(labels)))[1]
        store.append(batch[cells])
        kept_labels.append(labels[cells])
    labels = np.concatenate(kept_labels).astype(np.int32) if kept_labels else np.zeros(0, np.int32)
    return PatchSet(store.result(), labels, source_images=len(labelled), excluded=excluded)


# --------------------------------------------------------------------------- lesion maps


@dataclasses.dataclass
class LesionMap:
    """The local net's reading of one image.

    Attributes:
        weights: the weighting matrix M (size, size) float32 in [0, 4].
        labels: the label map L (n, n) int64 (argmax).
        probs: the probability map P (n, n) float32 (largest probability).
        class_probs: every patch's softmax (n * n, 4), grid order.
    """

    weights: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    class_probs: np.ndarray


def lesion_map(local_net, image, patch: int, overlap: int, batch_size: int = 256) -> LesionMap:
    """Run the local net over the grid of a preprocessed square image and build M.

    Same maths as `rmib.grading.predict_lesion_map`, keeping every patch's
    softmax as well (for lesion-vs-normal ROC curves).
    """
    image = np.asarray(image)
    size = image.shape[0]
    run = getattr(local_net, "predict_on_batch", local_net)
    scores = [
        np.asarray(run(batch.astype(np.float32)), np.float32)
        for _, batch in iter_patch_batches(image, size, patch, overlap, batch_size)
    ]
    class_probs = np.concatenate(scores)
    n = len(grid_positions(size, patch, overlap))
    labels = class_probs.argmax(axis=1).astype(np.int64).reshape(n, n)
    probs = np.clip(class_probs.max(axis=1), 0.0, 1.0).reshape(n, n)
    weights = weighted_lesion_map(labels, probs, size, patch, overlap)
    return LesionMap(weights, labels, probs, class_probs)


def global_input(image, size: int, weights=None) -> np.ndarray:
    """The global net's input: I* = (M / 4) * I (or I itself without `weights`), resized, uint8."""
    image = np.asarray(image)
    array = apply_lesion_map(image, weights) if weights is not None else image.astype(np.float32)
    resized, _ = resize_pad(array, size)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def build_global_arrays(
    records,
    local_net,
    cfg: GradeConfig,
    work: Path,
    name: str,
    *,
    on_bad: str = "error",
    problems: list | None = None,
    progress=None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The weighted (and, with `cfg.baseline`, plain) global inputs of graded records.

    Returns:
        (weighted (N, S, S, 3) uint8, plain or None, grades (N,) int32), memory-mapped
        under `work`.
    """
    problems = [] if problems is None else problems
    prep = cfg.preprocessing()
    shape = (cfg.global_size, cfg.global_size, 3)
    weighted = _Store(work / f"weighted_{name}.npy", len(records), shape)
    plain = _Store(work / f"plain_{name}.npy", len(records), shape) if cfg.baseline else None
    grades = []
    for record, image in _guarded(
        _progress(progress, records, f"Lesion maps ({name})"),
        lambda r: load_prepared(r, prep, cfg.cache_dir),
        on_bad,
        problems,
    ):
        found = lesion_map(local_net, image, cfg.patch_size, cfg.overlap, cfg.predict_batch)
        weighted.append(global_input(image, cfg.global_size, found.weights)[None])
        if plain is not None:
            plain.append(global_input(image, cfg.global_size)[None])
        grades.append(record.grade)
    return (
        weighted.result(),
        plain.result() if plain is not None else None,
        np.asarray(grades, np.int32),
    )


# --------------------------------------------------------------------------- training


def _without_validation(train_cfg: TrainConfig) -> TrainConfig:
    """No validation data: monitor the training counterpart of a `val_` quantity."""
    if train_cfg.monitor.startswith("val_"):
        return dataclasses.replace(train_cfg, monitor=train_cfg.monitor[len("val_") :])
    return train_cfg


def _split(records, fraction: float, seed: int, key):
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    return stratified_split(records, fraction, seed=seed, key=key)


def _start_epoch(run: RunDirectory, phase: str, resume: bool) -> int:
    last = run.checkpoint_path("last", phase)
    if not (resume and last.is_file()):
        return 0
    return int((read_run_metadata(last).get("checkpoint") or {}).get("epoch", 0))


def _refuse_existing(run: RunDirectory) -> None:
    for phase, file in PHASES.items():
        for path in (run.path / file, run.checkpoint_path("last", phase)):
            if path.exists():
                raise RmibError(
                    f"{run.path} already holds a grading run ({path.relative_to(run.path)} "
                    "exists); continue it with --resume, or choose another output directory"
                )


def _weights_arg(weights: str):
    return None if weights.strip().lower() in ("", "none") else weights


def _grade_counts(grades, num_classes) -> dict[str, int]:
    found = np.bincount(np.asarray(grades, np.int64), minlength=num_classes)
    return {str(g): int(found[g]) for g in range(num_classes)}


def _one_line_counts(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


class _Training:
    """The state one `train_grader` call shares between its phases."""

    def __init__(self, cfg, run, resume, echo, progress, verbose):
        self.cfg, self.run, self.resume = cfg, run, resume
        self.echo, self.progress, self.verbose = echo, progress, verbose
        self.metadata = {**grade_metadata(cfg), "data": [str(p) for p in cfg.data]}
        self.work = run.path / _WORK
        self.problems: list = []
        self.summary: dict = {}

    def done(self, phase: str) -> bool:
        """With --resume, a phase whose .keras file exists is finished."""
        return self.resume and (self.run.path / PHASES[phase]).is_file()

    def fit_phase(self, phase, build, train, val, train_cfg, augment, class_weight):
        """Train one phase through the runner, save <phase file>.keras, return the model."""
        if val is None:
            train_cfg = _without_validation(train_cfg)
        batch = global_batch_size(train_cfg)  # --batch-size is per replica
        train_ds, steps = array_dataset(
            *train,
            batch,
            augment=augment,
            seed=train_cfg.seed,
            start_epoch=_start_epoch(self.run, phase, self.resume),
            epochs=train_cfg.epochs,
        )
        val_ds = None
        if val is not None:
            val_ds, _ = array_dataset(*val, batch, shuffle=False)
        model, _ = fit(
            build,
            train_ds,
            val_ds,
            # The runner's own class weights are binary; these are the 4- or 5-class ones.
            config=dataclasses.replace(train_cfg, class_weights=False),
            run_dir=self.run,
            loss="sparse_categorical_crossentropy",
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            metadata=self.metadata,
            phase=phase,
            resume=self.resume,
            steps_per_epoch=steps,
            class_weight=class_weight if train_cfg.class_weights else None,
            save_final=False,
            verbose=self.verbose,
        )
        self.run.save_model(model, self.run.path / PHASES[phase], self.run.read_metadata())
        return model

    def local(self, records):
        """Phase "local": the patch classifier on mask-labelled patches."""
        cfg = self.cfg
        if self.done("local"):
            self.echo(f"phase local: {LOCAL_FILE} exists, done")
            return load_model(self.run.path / LOCAL_FILE)
        seed = cfg.local_train.seed
        train_records, val_records = _split(records, cfg.val_fraction, seed, key=lambda r: r.label)
        sets = {}
        for name, chosen in (("train", train_records), ("val", val_records)):
            sets[name] = build_patch_set(
                chosen,
                cfg,
                self.work / f"patches_{name}.npy",
                seed=seed,
                on_bad=cfg.on_bad,
                problems=self.problems,
                progress=self.progress,
                label=f"Patches ({name})",
            )
        train, val = sets["train"], sets["val"]
        if train is None or not len(train.labels):
            raise RmibError("none of the training images with lesion masks could be read")
        if not np.any(train.labels > 0):
            raise RmibError(
                f"the {train.source_images} training images with masks give no lesion patch: "
                f"no {cfg.patch_size}x{cfg.patch_size} patch holds {cfg.min_pixels} or more MA, "
                f"HE or EX pixels at {cfg.image_size} px; lower --min-pixels or check the masks"
            )
        if val is not None and not len(val.labels):
            val = None
        self.summary["patches"] = {
            name: {
                **s.counts(),
                "images": s.source_images,
                "soft_exudate_only_left_out": s.excluded,
            }
            for name, s in sets.items()
            if s is not None
        }
        self.echo(
            f"phase local: {len(train.labels)} training patches ({_one_line_counts(train.counts())})"
            f" from {train.source_images} images, {train.excluded} SE-only patches left out"
            + (f"; {len(val.labels)} validation patches" if val is not None else "")
        )
        return self.fit_phase(
            "local",
            lambda: build_local_net(cfg.patch_size, len(PATCH_CLASSES), cfg.dropout),
            (train.images, train.labels),
            (val.images, val.labels) if val is not None else None,
            cfg.local_train,
            cfg.local_augment,
            balanced_class_weights(train.labels, len(PATCH_CLASSES)),
        )

    def global_phases(self, records, local_net) -> None:
        """Phases "global" (on I*) and "global_plain" (on the Graham image, the baseline)."""
        cfg = self.cfg
        phases = {"global": "weighted"} | ({"global_plain": "plain"} if cfg.baseline else {})
        todo = {phase: kind for phase, kind in phases.items() if not self.done(phase)}
        for phase in phases.keys() - todo.keys():
            self.echo(f"phase {phase}: {PHASES[phase]} exists, done")
        if not todo:
            return
        train_records, val_records = _split(
            records, cfg.val_fraction, cfg.train.seed, key=lambda r: r.grade
        )
        arrays = {}
        for name, chosen in (("train", train_records), ("val", val_records)):
            weighted, plain, grades = build_global_arrays(
                chosen,
                local_net,
                cfg,
                self.work,
                name,
                on_bad=cfg.on_bad,
                problems=self.problems,
                progress=self.progress,
            )
            if len(grades):
                arrays[name] = {"weighted": weighted, "plain": plain, "grades": grades}
        if "train" not in arrays:
            raise RmibError(
                f"none of the {len(train_records)} graded training images could be read"
            )
        self.summary["grades"] = {
            name: _grade_counts(a["grades"], cfg.num_classes) for name, a in arrays.items()
        }
        self.echo(
            f"global nets: {len(arrays['train']['grades'])} training images (grades "
            f"{_one_line_counts(self.summary['grades']['train'])})"
            + (f"; {len(arrays['val']['grades'])} validation images" if "val" in arrays else "")
        )
        weights = balanced_class_weights(arrays["train"]["grades"], cfg.num_classes)
        for phase, kind in todo.items():
            what = (
                "the weighted lesion map I* = (M/4) * I"
                if kind == "weighted"
                else "the plain Graham image"
            )
            self.echo(f"phase {phase}: global net ({cfg.global_net}) on {what}")
            val = arrays.get("val")
            self.fit_phase(
                phase,
                lambda: build_global_net(
                    cfg.global_size,
                    cfg.num_classes,
                    cfg.global_net,
                    cfg.dropout,
                    _weights_arg(cfg.global_weights),
                ),
                (arrays["train"][kind], arrays["train"]["grades"]),
                (val[kind], val["grades"]) if val else None,
                cfg.train,
                cfg.augment,
                weights,
            )


def train_grader(
    cfg: GradeConfig,
    run_dir,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    progress=None,
    verbose=2,
) -> dict:
    """Train the local net, then the global net on weighted lesion maps (and the plain baseline).

    Phases (each with its own history_<phase>.csv and checkpoints): "local"
    (patches labelled from MA/HE/EX masks), "global" (I* = (M / 4) * I of the
    graded images, M from the trained local net) and, with `cfg.baseline`,
    "global_plain" (the Graham image itself). Each saves its `.keras` file
    (`PHASES`) when done.

    Args:
        cfg: the GradeConfig (its `data` lists the dataset roots).
        run_dir: the run directory (created).
        resume: continue an interrupted run; a phase whose `.keras` file
            exists is done and is loaded instead of trained.
        echo: where progress messages go.
        progress: optional wrapper `progress(items, label) -> items` (a progress bar).
        verbose: Keras verbosity of `fit`.

    Returns:
        What the run trained on (also merged into metrics.json under "data").

    Raises:
        RmibError: no data, no image with MA/HE/EX masks, no graded image, no
            lesion patch, an existing run without `resume`, and the runner's errors.
    """
    roots = [Path(p) for p in cfg.data]
    data = read_grading_data(
        roots, cfg.num_classes, exclude_split=cfg.holdout_split, on_bad=cfg.on_bad
    )
    if not data.masked:
        raise no_masks_error(roots, data, cfg.holdout_split)
    if not data.graded:
        raise no_grades_error(roots, data, cfg.num_classes)
    run = RunDirectory(run_dir)
    if not resume:
        _refuse_existing(run)
    run.write_config(cfg)
    training = _Training(cfg, run, resume, echo, progress, verbose)
    run.write_metadata(training.metadata)
    training.problems += data.problems
    training.summary.update(
        masked_images=len(data.masked),
        graded_images=len(data.graded),
        left_out_grades=data.left_out_grades,
        held_out_split_images=data.held_out,
    )
    notes = [f"{len(data.masked)} images with MA/HE/EX masks, {len(data.graded)} graded images"]
    if data.left_out_grades:
        notes.append(f"{data.left_out_grades} of grade >= {cfg.num_classes} left out")
    if data.held_out:
        notes.append(f"{data.held_out} images of split {cfg.holdout_split!r} held out")
    echo("; ".join(notes))
    local_net = training.local(data.masked)
    training.global_phases(data.graded, local_net)
    shutil.rmtree(training.work, ignore_errors=True)
    if training.problems:
        _write_skipped(run.path, training.problems)
        training.summary["skipped_files"] = len(training.problems)
    run.update_metrics({"data": training.summary})
    return training.summary


# --------------------------------------------------------------------------- prediction


@dataclasses.dataclass
class GradeResult:
    """The grade of one photograph.

    Attributes:
        grade: the predicted grade (argmax of `probs`).
        probs: the global net's class probabilities (K,).
        lesion_map: the local net's `LesionMap` (M, L, P).
        plain_grade, plain_probs: the non-weighted baseline's, when the run has it.
    """

    grade: int
    probs: np.ndarray
    lesion_map: LesionMap
    plain_grade: int | None = None
    plain_probs: np.ndarray | None = None


class Grader:
    """A trained two-stage grader: local net, global net (and baseline) with the run's metadata.

    Args:
        local_net, global_net: the trained Keras models, or their `.keras`
            files (loaded on first use, so a command fails fast on bad data).
        metadata: the run's rmib.json (grid, sizes, grades, preprocessing).
        plain_net: the non-weighted baseline (model or file), or None.
        batch_size: patches per local-net call.
        unsafe: allow Lambda layers when loading the files (trusted files only).
    """

    def __init__(
        self, local_net, global_net, metadata: dict, plain_net=None, batch_size=256, unsafe=False
    ):
        self._models = {"local": local_net, "global": global_net, "global_plain": plain_net}
        self._unsafe = unsafe
        self.metadata = dict(metadata)
        self.image_size = int(metadata["image_size"])
        self.patch_size = int(metadata["patch_size"])
        self.overlap = int(metadata["overlap"])
        self.min_pixels = int(metadata.get("min_pixels", 3))
        self.num_classes = int(metadata["grades"])
        self.global_size = int(metadata["global_size"])
        self.preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        self.batch_size = int(batch_size)

    def _model(self, phase: str):
        model = self._models[phase]
        if isinstance(model, (str, Path)):
            model = self._models[phase] = load_model(model, unsafe=self._unsafe)
        return model

    @property
    def local_net(self):
        return self._model("local")

    @property
    def global_net(self):
        return self._model("global")

    @property
    def plain_net(self):
        return self._model("global_plain")

    @classmethod
    def load(cls, run_dir, batch_size: int = 256, unsafe: bool = False) -> Grader:
        """The grader of a `rmib grade train` run directory (models loaded on first use).

        Raises:
            RmibError: not a run directory, not a grading run, or a model file missing.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RmibError(f"{run_dir}: no such run directory (expected a rmib grade train --out)")
        metadata = read_run_metadata(run_dir)
        if metadata.get("task") != TASK:
            raise RmibError(
                f"{run_dir}: not a grading run (its rmib.json has task "
                f"{metadata.get('task')!r}; expected {TASK!r} from rmib grade train)"
            )
        files = {}
        for phase, file in PHASES.items():
            path = run_dir / file
            if path.is_file():
                files[phase] = path
            elif phase != "global_plain" or metadata.get("baseline"):
                raise RmibError(
                    f"{path}: missing; the run has not finished (continue it with "
                    "rmib grade train --resume)"
                )
        return cls(
            files["local"], files["global"], metadata, files.get("global_plain"), batch_size, unsafe
        )

    def prepare(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model input, display image): the photograph preprocessed, and placed the same
        way without Graham (for pictures)."""
        image, _, _ = preprocess_array(raw, self.preprocessing)
        shown, _, _ = preprocess_array(raw, dataclasses.replace(self.preprocessing, method="none"))
        return image, shown

    def _probs(self, model, x) -> np.ndarray:
        return np.asarray(model.predict_on_batch(x[None].astype(np.float32)), np.float32)[0]

    def grade_prepared(self, image) -> GradeResult:
        """Grade a preprocessed (image_size, image_size, 3) photograph."""
        image = np.asarray(image)
        if image.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(
                f"the grader expects {self.image_size}x{self.image_size} preprocessed images, "
                f"got {image.shape}"
            )
        found = lesion_map(self.local_net, image, self.patch_size, self.overlap, self.batch_size)
        probs = self._probs(self.global_net, global_input(image, self.global_size, found.weights))
        result = GradeResult(int(probs.argmax()), probs, found)
        if self.plain_net is not None:
            plain = self._probs(self.plain_net, global_input(image, self.global_size))
            result.plain_grade, result.plain_probs = int(plain.argmax()), plain
        return result


def lesion_map_picture(image, found: LesionMap, patch: int, overlap: int) -> np.ndarray:
    """Two panels: the photograph with M as a heat map, and the lesion patches outlined by class.

    The heat is (M - 1) / 3 clipped to [0, 1]: 0 for a sure normal patch
    (weight 1), 1 for a sure exudate (weight 4). Outlines use
    `rmib.report.LESION_COLOURS` (MA cyan, HE red, EX yellow), drawn in
    order of severity so the most severe is on top.
    """
    image = np.asarray(image, np.uint8)
    size = image.shape[0]
    heat = np.clip((found.weights - 1.0) / (MAX_WEIGHT - 1.0), 0.0, 1.0)
    heat_panel = report.probability_overlay(image, heat, colour=HEAT_COLOUR, alpha=0.85)
    boxes = np.ascontiguousarray(image.copy())
    positions = grid_positions(size, patch, overlap)
    # Outlines stay visible after the sheet scales an 800 px image down to 512 px.
    thickness = max(1, round(size / 400))
    for label in range(1, len(PATCH_CLASSES)):
        colour = tuple(int(c) for c in report.LESION_COLOURS[PATCH_CLASSES[label]])
        for i, j in zip(*np.nonzero(found.labels == label), strict=True):
            y, x = positions[i], positions[j]
            cv2.rectangle(boxes, (x, y), (x + patch - 1, y + patch - 1), colour, thickness)
    return report.contact_sheet(
        [[heat_panel, boxes]],
        tile=int(np.clip(size, PICTURE_MIN_TILE, PICTURE_MAX_TILE)),
        labels=["weighted lesion map M", "MA cyan, HE red, EX yellow"],
    )


def predict_images(
    grader: Grader,
    paths,
    out,
    *,
    on_bad: str = "error",
    echo: Callable[[str], None] = print,
    progress=None,
) -> list[dict]:
    """Grade photographs; write predictions.csv and <stem>_lesion_map.png to `out`.

    Returns:
        One row per graded image: image, grade, prob_<g> ..., patch counts,
        (plain_grade with a baseline), map file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    for path, raw in _guarded(
        _progress(progress, list(paths), "Grading"), io.read_image, on_bad, problems
    ):
        image, shown = grader.prepare(raw)
        result = grader.grade_prepared(image)
        picture = out / f"{Path(path).stem}_lesion_map.png"
        io.write_image(
            picture, lesion_map_picture(shown, result.lesion_map, grader.patch_size, grader.overlap)
        )
        counts = np.bincount(result.lesion_map.labels.ravel(), minlength=len(PATCH_CLASSES))
        row = {"image": str(path), "grade": result.grade}
        row.update({f"prob_{g}": round(float(p), 6) for g, p in enumerate(result.probs)})
        row.update({f"patches_{c}": int(counts[k]) for k, c in enumerate(PATCH_CLASSES)})
        if result.plain_grade is not None:
            row["plain_grade"] = result.plain_grade
        row["lesion_map"] = picture.name
        rows.append(row)
        probs = ", ".join(f"{g}: {p:.3f}" for g, p in enumerate(result.probs))
        echo(f"{Path(path).name}: grade {result.grade} ({probs})")
    if problems:
        _write_skipped(out, problems)
        if not rows:
            raise RmibError(f"no image could be read; see {out / 'skipped.csv'}")
    _write_rows(out / "predictions.csv", rows)
    return rows


# --------------------------------------------------------------------------- evaluation


def _ratio(numerator, denominator) -> float:
    # rmib's convention (rmib.metrics): 0/0 is 1; the counts beside it say when that happened.
    return float(numerator) / float(denominator) if denominator else 1.0


def patch_report(true_labels, class_probs) -> dict:
    """Patch-level metrics of the local net (Yang et al., Table V, Fig. 5 and Fig. 6).

    Args:
        true_labels: (N,) patch labels 0..3 (excluded patches already left out).
        class_probs: (N, 4) softmax of the local net.

    Returns:
        confusion_matrix [true][predicted], accuracy, per-class recall,
        precision, support (true patches) and predicted count, and
        lesion_vs_normal: `rmib.metrics.binary_classification_report` of
        lesion (label > 0) against normal with score 1 - P(normal).
    """
    true_labels = np.asarray(true_labels, np.int64)
    class_probs = np.asarray(class_probs, np.float64)
    k = len(PATCH_CLASSES)
    predicted = class_probs.argmax(axis=1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true_labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(PATCH_CLASSES):
        per_class[name] = {
            "recall": _ratio(confusion[c, c], confusion[c].sum()),
            "precision": _ratio(confusion[c, c], confusion[:, c].sum()),
            "support": int(confusion[c].sum()),
            "predicted": int(confusion[:, c].sum()),
        }
    return {
        "patches": int(true_labels.size),
        "classes": list(PATCH_CLASSES),
        "confusion_matrix": confusion.tolist(),
        "accuracy": _ratio(np.trace(confusion), confusion.sum()),
        "per_class": per_class,
        "lesion_vs_normal": metrics.binary_classification_report(
            true_labels > 0, 1.0 - class_probs[:, 0]
        ),
    }


def grading_report(true_grades, probs, num_classes: int) -> dict:
    """Image-level metrics of a global net (Yang et al., Sec. IV-E).

    Args:
        true_grades: (N,) grades 0..num_classes-1.
        probs: (N, num_classes) softmax of the global net.

    Returns:
        quadratic weighted kappa (`rmib.metrics.quadratic_kappa`; NaN when
        undefined), accuracy, confusion matrix, and two binary reports
        (`rmib.metrics.binary_classification_report`, ROC AUC NaN with one
        class only): any_dr (grade >= 1, score 1 - P(grade 0)) and
        referable_dr (grade >= 2, score P(grade >= 2)).
    """
    true_grades = np.asarray(true_grades, np.int64)
    probs = np.asarray(probs, np.float64)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (true_grades, predicted), 1)
    return {
        "images": int(true_grades.size),
        "kappa": metrics.quadratic_kappa(true_grades, predicted, num_classes=num_classes),
        "accuracy": float(np.mean(true_grades == predicted)),
        "confusion_matrix": confusion.tolist(),
        "any_dr": metrics.binary_classification_report(true_grades >= 1, 1.0 - probs[:, 0]),
        "referable_dr": metrics.binary_classification_report(
            true_grades >= REFERABLE_GRADE, probs[:, REFERABLE_GRADE:].sum(axis=1)
        ),
    }


METRIC_NOTES = {
    "null": "an undefined value: quadratic kappa when every true and predicted grade is one "
    "same class; ROC AUC when the images (or patches) hold only one class",
    "ratios": "recall/precision with nothing to count (0/0) are 1, as everywhere in rmib; "
    "'support' and 'predicted' give the counts",
    "lesion_vs_normal": "patches: lesion (MA, HE or EX) against normal, score 1 - P(normal)",
    "any_dr": "images: grade >= 1 against grade 0, score 1 - P(grade 0)",
    "referable_dr": "images: grade >= 2 (moderate NPDR or worse) against grades 0-1, "
    "score P(grade >= 2)",
}


def resolve_split(roots, split: str = "auto", on_bad: str = "error") -> str | None:
    """The split `rmib grade evaluate --split` means: "auto" is "test" when a tree has one
    (it was held out of training), else None (every image), as is "all"."""
    if split == "all":
        return None
    if split != "auto":
        return split
    for root in roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        if any(r.split == "test" for r in dataset.records):
            return "test"
    return None


def evaluate_grader(
    grader: Grader,
    roots,
    out,
    *,
    split: str = "auto",
    on_bad: str = "error",
    cache_dir=None,
    echo: Callable[[str], None] = print,
    progress=None,
) -> dict:
    """Evaluate a grader: patch level on images with masks, image level on graded images.

    Writes metrics.json (NaN written as null, see its "notes"), per_image.csv,
    and ROC curves (patch_roc.png; referable_roc_weighted.png and
    referable_roc_plain.png) to `out`.

    Args:
        grader: a loaded `Grader`.
        roots: dataset folders.
        out: output folder.
        split: "auto" (the trees' "test" split when they have one, else all
            images), "all", or one split name.

    Raises:
        RmibError: no image with MA/HE/EX masks and no graded image in the roots.
    """
    if split not in EVALUATION_SPLITS:
        raise RmibError(f"unknown split {split!r}; expected one of {', '.join(EVALUATION_SPLITS)}")
    roots = [Path(r) for r in roots]
    out = Path(out)
    chosen = resolve_split(roots, split, on_bad)
    data = read_grading_data(roots, grader.num_classes, split=chosen, on_bad=on_bad)
    where = f" in split {chosen!r}" if chosen else ""
    if not data.masked and not data.graded:
        raise RmibError(
            f"nothing to evaluate in {_roots_text(roots)}{where}: expected images with lesion "
            "masks for all of MA, HE and EX (patch level) or graded images (image level)"
        )
    out.mkdir(parents=True, exist_ok=True)
    problems = list(data.problems)
    result = {
        "run_metadata": {
            k: grader.metadata.get(k)
            for k in ("image_size", "patch_size", "overlap", "grades", "global_net", "global_size")
        },
        "data": [str(r) for r in roots],
        "split": chosen or "all",
        "notes": METRIC_NOTES,
        "patch": None,  # stays None when no image could be read for it
        "image": None,
    }

    if data.masked:
        true, scores, excluded, images = [], [], 0, 0
        prep = grader.preprocessing
        for _, (masks, image) in _guarded(
            _progress(progress, data.masked, "Patches"),
            lambda r: (read_masks(r, prep), load_prepared(r, prep, cache_dir)),
            on_bad,
            problems,
        ):
            labels = patch_labels_from_masks(
                masks, grader.image_size, grader.patch_size, grader.overlap, grader.min_pixels
            ).reshape(-1)
            found = lesion_map(
                grader.local_net, image, grader.patch_size, grader.overlap, grader.batch_size
            )
            keep = labels != EXCLUDED
            excluded += int(np.count_nonzero(~keep))
            true.append(labels[keep])
            scores.append(found.class_probs[keep])
            images += 1
        if images:
            true, scores = np.concatenate(true), np.concatenate(scores)
            result["patch"] = {
                "images": images,
                "excluded_soft_exudate_only": excluded,
                **patch_report(true, scores),
            }
            if 0 < np.count_nonzero(true) < true.size:
                metrics.save_roc_curve(
                    true > 0,
                    1.0 - scores[:, 0],
                    out / "patch_roc.png",
                    title="Lesion vs normal patches",
                )
    else:
        echo(f"no image{where} has MA/HE/EX masks: patch-level metrics skipped")

    if data.graded:
        rows, grades, weighted, plain = [], [], [], []
        for record, image in _guarded(
            _progress(progress, data.graded, "Grading"),
            lambda r: load_prepared(r, grader.preprocessing, cache_dir),
            on_bad,
            problems,
        ):
            graded = grader.grade_prepared(image)
            grades.append(record.grade)
            weighted.append(graded.probs)
            row = {"image": str(record.image), "grade": record.grade, "weighted": graded.grade}
            if graded.plain_probs is not None:
                plain.append(graded.plain_probs)
                row["plain"] = graded.plain_grade
            row.update(
                {f"weighted_prob_{g}": round(float(p), 6) for g, p in enumerate(graded.probs)}
            )
            rows.append(row)
        if rows:
            image_level = {"left_out_grades": data.left_out_grades}
            for name, probs in (("weighted", weighted), ("plain", plain)):
                if not probs:
                    continue
                image_level[name] = grading_report(grades, np.stack(probs), grader.num_classes)
                y = np.asarray(grades) >= REFERABLE_GRADE
                if 0 < np.count_nonzero(y) < y.size:
                    metrics.save_roc_curve(
                        y,
                        np.stack(probs)[:, REFERABLE_GRADE:].sum(axis=1),
                        out / f"referable_roc_{name}.png",
                        title=f"Referable DR, {name}",
                    )
            result["image"] = image_level
            _write_rows(out / "per_image.csv", rows)
    else:
        echo(f"no graded image{where}: image-level metrics skipped")

    if problems:
        _write_skipped(out, problems)
    _write_json(out / "metrics.json", result)
    return result


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"


def format_metrics(result: dict) -> str:
    """The small table `rmib grade evaluate` prints: weighted vs non-weighted, then patches."""
    lines = []
    image = result.get("image")
    if image:
        columns = [c for c in ("weighted", "plain") if c in image]
        n = image[columns[0]]["images"]
        lines.append(f"Image level ({n} graded images, split {result['split']})")
        lines.append(f"  {'':<34}" + "".join(f"{c:>10}" for c in columns))
        for label, get in (
            ("quadratic weighted kappa", lambda r: r["kappa"]),
            ("accuracy", lambda r: r["accuracy"]),
            ("any-DR ROC AUC (grade >= 1)", lambda r: r["any_dr"]["roc_auc"]),
            ("referable-DR ROC AUC (grade >= 2)", lambda r: r["referable_dr"]["roc_auc"]),
        ):
            lines.append(
                f"  {label:<34}" + "".join(f"{_number(get(image[c])):>10}" for c in columns)
            )
    patch = result.get("patch")
    if patch:
        lines.append(
            f"Patch level ({patch['patches']} patches from {patch['images']} images with masks)"
        )
        lines.append(f"  {'class':<8}{'recall':>10}{'precision':>11}{'patches':>9}")
        for name, row in patch["per_class"].items():
            lines.append(
                f"  {name:<8}{_number(row['recall']):>10}{_number(row['precision']):>11}"
                f"{row['support']:>9}"
            )
        auc = _number(patch["lesion_vs_normal"]["roc_auc"])
        lines.append(f"  lesion-vs-normal ROC AUC: {auc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _write_json(path: Path, data) -> None:
    with io.atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with io.atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())


def _write_skipped(out: Path, problems) -> None:
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "reason"])
    writer.writerows(problems)
    with io.atomic_write(Path(out) / "skipped.csv", "w", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
