"""Decoding checks of a dataset read: `check_dataset`, `summarize_dataset`,
`require_lesion_pixels`."""

from __future__ import annotations

import collections
import os
from pathlib import Path

from rmib import io
from rmib.data.readers.common import SPLIT_ORDER, Problems, check_on_bad
from rmib.data.records import Dataset, Record
from rmib.errors import BadInputError, RmibError


def check_dataset(dataset: Dataset, on_bad="error", progress=None) -> list:
    """Decode every image and mask of `dataset`.

    Each mask must decode and have its image's size.

    Args:
        dataset: what `read_dataset` returned.
        on_bad: "error" raises at the first bad file; "skip" collects them all.
        progress: optional wrapper around the records iterable (a progress bar).

    Returns:
        [(path, reason)] for every bad file found (empty when all are good).

    Raises:
        BadInputError: with on_bad="error", for the first bad file.
    """
    check_on_bad(on_bad)
    bad = Problems(on_bad)
    records = progress(dataset.records) if progress else dataset.records
    for record in records:
        _check_record(record, bad, decode=True)
    return bad.items


def summarize_dataset(dataset: Dataset, decode=True, progress=None) -> dict:
    """Counts, sizes and bad files of a dataset, as a JSON-ready dict.

    Every image is read (decoded when `decode`, else only its header), and every
    mask too; bad files are collected, never raised.

    Returns:
        {"root", "layout", "decoded", "images", "labels", "grades", "lesions",
        "splits", "sizes", "problems"}: "grades" maps grade -> images,
        "labels" {"healthy", "lesion", "unknown"} -> images, "lesions" maps a
        lesion code -> {"images": images with a mask file, "annotated": images
        annotated for it, and when decoded "nonempty": images whose mask has
        lesion pixels}, "splits" maps a split to the same counts,
        "sizes" "WxH" -> images, "problems" [{"path", "reason"}] including
        those the reader skipped.
    """
    bad = Problems("skip")
    sizes = collections.Counter()
    nonempty = []  # per record: the mask types with lesion pixels (known when decoded)
    records = progress(dataset.records) if progress else dataset.records
    for record in records:
        size, with_pixels = _check_record(record, bad, decode=decode)
        nonempty.append(with_pixels)
        if size is not None:
            sizes[f"{size[0]}x{size[1]}"] += 1
    summary = {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "decoded": bool(decode),
    }
    pixels = nonempty if decode else None
    summary.update(_counts(dataset.records, dataset.lesions, pixels))
    splits = sorted(
        {r.split for r in dataset.records if r.split is not None},
        key=lambda s: (SPLIT_ORDER.get(s, 9), s),
    )
    summary["splits"] = {}
    for split in splits:
        chosen = [i for i, r in enumerate(dataset.records) if r.split == split]
        summary["splits"][split] = _counts(
            [dataset.records[i] for i in chosen],
            dataset.lesions,
            [nonempty[i] for i in chosen] if decode else None,
        )
    summary["sizes"] = dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))
    summary["problems"] = [
        {"path": str(path), "reason": reason} for path, reason in [*dataset.problems, *bad.items]
    ]
    return summary


def require_lesion_pixels(records, lesion: str, root) -> None:
    """Refuse a set of masks of `lesion` in which not one pixel is a lesion.

    Single empty masks are normal (DDR has them); every mask file of a
    dataset decoding to all zero is not: masks converted with a tool that
    thresholds the lesion colour away come out so. Masks are decoded as
    `summarize_dataset` decodes them, stopping at the first one with lesion
    pixels; unreadable ones are left to the reader of the run.

    Args:
        records: the records of one dataset root annotated for `lesion`.
        lesion: the lesion code.
        root: the dataset root, named in the message.

    Raises:
        RmibError: naming the lesion and the mask folder, when some mask files
            decode and every one of them is all zero (images annotated as
            without the lesion, with no mask file, are not counted).
    """
    files = [r.masks[lesion] for r in records if r.masks.get(lesion) is not None]
    decoded = 0
    for path in files:
        try:
            if has_lesion_pixels(path):
                return
        except BadInputError:
            continue
        decoded += 1
    if decoded:
        folder = os.path.commonpath([str(Path(f).parent) for f in files])
        raise RmibError(
            f"{folder}: all {decoded} {lesion} mask files decode to all zero (no lesion "
            f"pixel), which is nothing to learn or score; check how they were converted "
            f"(a palette colour turned to 1-bit comes out black), e.g. with "
            f"`rmib data inspect {root}`"
        )


def has_lesion_pixels(mask_path, expected_shape=None) -> bool:
    """True when the mask file holds at least one lesion pixel (any non-zero value)."""
    return bool(io.read_mask(mask_path, expected_shape=expected_shape).any())


# ----------------------------------------------------------------------------
# Checking and counting


def _check_record(record: Record, bad, decode: bool):
    """Read one record's image and masks (decoded, or header only).

    Returns:
        ((width, height) or None when unreadable, {mask types with lesion pixels}).
    """
    size, with_pixels = None, set()
    try:
        if decode:
            image = io.read_image(record.image)
            size = (image.shape[1], image.shape[0])
        else:
            size = io.image_size(record.image)
    except BadInputError as exc:
        bad(exc.path, exc.reason)
    for code, mask in record.masks.items():
        if mask is None:
            continue
        try:
            if decode:
                shape = (size[1], size[0]) if size else None
                if has_lesion_pixels(mask, expected_shape=shape):
                    with_pixels.add(code)
            else:
                width, height = io.image_size(mask)
                if size and (width, height) != tuple(size):
                    raise BadInputError(
                        mask,
                        f"mask is {width}x{height} but its image is {size[0]}x{size[1]} "
                        "(width x height)",
                    )
        except BadInputError as exc:
            bad(exc.path, exc.reason)
    return size, with_pixels


def _counts(records, lesions, nonempty=None) -> dict:
    """Counts of `records`; `nonempty` (one set of mask types per record) adds
    the images whose mask has lesion pixels."""
    grades = collections.Counter(r.grade for r in records if r.grade is not None)
    labels = collections.Counter(
        {0: "healthy", 1: "lesion"}.get(r.label, "unknown") for r in records
    )
    return {
        "images": len(records),
        "labels": {k: labels[k] for k in ("healthy", "lesion", "unknown") if labels[k]},
        "grades": {str(g): grades[g] for g in sorted(grades)},
        "lesions": {code: _lesion_counts(records, code, nonempty) for code in lesions},
    }


def _lesion_counts(records, code, nonempty) -> dict:
    counts = {
        "images": sum(r.masks.get(code) is not None for r in records),
        "annotated": sum(r.has_mask(code) for r in records),
    }
    if nonempty is not None:
        counts["nonempty"] = sum(code in codes for codes in nonempty)
    return counts
