"""The grader's data: records sorted by use, patch sets, global-net inputs, result files.

Everything that reads a dataset tree or writes the grader's tables:
`read_grading_data` sorts the records of several trees into masked and graded
ones; `build_patch_set` and `build_global_arrays` turn them into memory-mapped
uint8 arrays for the local and global nets; `array_dataset` streams them to
the training runner.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf

from rmib import io
from rmib.data import readers
from rmib.data.augment import augment_pair, example_seed
from rmib.data.pipeline import (
    AUTOTUNE,
    PreprocessedCache,
    Preprocessing,
    epoch_datasets,
    preprocess_array,
)
from rmib.errors import BadInputError, RmibError
from rmib.methods.grading.config import MASK_LESIONS, GradeConfig
from rmib.methods.grading.lesion_map import global_input, predict_lesion_map
from rmib.methods.grading.patches import (
    EXCLUDED,
    PATCH_CLASSES,
    iter_patch_batches,
    patch_labels_from_masks,
)


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


def roots_text(roots) -> str:
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
        f"no image in {roots_text(roots)} has lesion masks for all of MA, HE and EX{held}; "
        "the local net's patch labels come from them. Add a tree with such masks, e.g. IDRiD "
        "'A. Segmentation', DDR 'lesion_segmentation' or a folder with images/ + masks/MA, HE, EX"
    )


def no_grades_error(roots, data: GradingData, num_classes: int) -> RmibError:
    if data.left_out_grades:
        return RmibError(
            f"every graded image in {roots_text(roots)} ({data.left_out_grades}) has a grade "
            f">= {num_classes}, which a {num_classes}-grade model leaves out; use --grades 5"
        )
    return RmibError(
        f"no graded image in {roots_text(roots)}; the global net learns DR grades from a "
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


def guarded(items: Iterable, load: Callable, on_bad: str, problems: list):
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


def with_progress(progress, items, label):
    return progress(items, label) if progress else items


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
    whose only lesion is a soft exudate (`patches.EXCLUDED`) are left out.
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
    for record, masks in guarded(
        with_progress(progress, records, f"{label}: labelling"),
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
    for (_, labels, i), image in guarded(
        with_progress(progress, chosen, f"{label}: cutting"),
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
    for record, image in guarded(
        with_progress(progress, records, f"Lesion maps ({name})"),
        lambda r: load_prepared(r, prep, cfg.cache_dir),
        on_bad,
        problems,
    ):
        found = predict_lesion_map(local_net, image, cfg.patch_size, cfg.overlap, cfg.predict_batch)
        weighted.append(global_input(image, cfg.global_size, found.weights)[None])
        if plain is not None:
            plain.append(global_input(image, cfg.global_size)[None])
        grades.append(record.grade)
    return (
        weighted.result(),
        plain.result() if plain is not None else None,
        np.asarray(grades, np.int32),
    )
