"""Patches of the grid and their labels from lesion masks (Yang et al., MICCAI 2017).

The local network classifies h x h patches into 0 normal, 1 microaneurysm,
2 haemorrhage, 3 exudate (`PATCH_CLASSES`). The paper's patches were labelled
by hand; rmib derives the labels from the pixel masks of the datasets that
have them (IDRiD, DDR, e-ophtha) with the rule of `patch_labels_from_masks`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping

import numpy as np

from rmib.methods.grading.grid import DEFAULT_OVERLAP, DEFAULT_PATCH, grid_boxes, grid_positions

PATCH_CLASSES = ("normal", "MA", "HE", "EX")
LESION_CLASSES = {"MA": 1, "HE": 2, "EX": 3}
EXCLUDED = -1
# At 800 px a microaneurysm covers a few pixels: on the IDRiD training masks
# (4288 px wide, padded to square and scaled to 800 px) the median MA is 9 px,
# 4% are under 2 px, 9% under 3 px and 16% under 4 px. 3 px keeps over 90% of
# them while a 1-2 px fringe of a lesion cut by the patch edge does not count.
DEFAULT_MIN_PIXELS = 3
_IGNORED_MASKS = ("OD",)


def _check_square(array: np.ndarray, size: int, what: str) -> None:
    if array.shape[:2] != (size, size):
        raise ValueError(
            f"{what} must be {size}x{size} (the grid's image size), got shape {array.shape}"
        )


def _patch_counts(mask: np.ndarray, positions: np.ndarray, patch: int) -> np.ndarray:
    """(n, n) number of non-zero mask pixels in each patch, via a summed-area table."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = (mask != 0).cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    top, left = positions[:, None], positions[None, :]
    bottom, right = top + patch, left + patch
    return table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]


def patch_labels_from_masks(
    masks: Mapping[str, np.ndarray | None],
    size: int,
    patch: int = DEFAULT_PATCH,
    overlap: int = DEFAULT_OVERLAP,
    min_pixels: int = DEFAULT_MIN_PIXELS,
) -> np.ndarray:
    """Label every patch of the grid from the lesion masks of one image.

    Rule: in each patch count the lesion pixels of MA (class 1), HE (class 2)
    and EX (class 3). The label is the class with the most pixels if that count
    is at least ``min_pixels`` (ties go to the lower class), else 0 (normal).
    A patch with no MA, HE or EX of at least ``min_pixels`` pixels but with at
    least ``min_pixels`` pixels of soft exudate (SE) is left out (label -1,
    `EXCLUDED`): the paper has no class for it and it is not normal. Lesion
    counts below ``min_pixels`` are ignored, so such a patch is normal.

    A lesion missing from ``masks`` or mapped to None counts as absent
    (``Record.masks`` convention); use images annotated for all of MA, HE and
    EX, or a patch "normal" here may hold an unannotated lesion. An optic disc
    mask ("OD") is ignored.

    Args:
        masks: lesion code -> (size, size) mask, non-zero = lesion, or None.
        size: side of the square image the masks belong to (after resizing).
        patch: side of a patch, in pixels.
        overlap: pixels shared by neighbouring patches.
        min_pixels: the fewest lesion pixels for a patch to count as that lesion.

    Returns:
        int array (n, n) in grid order (`grid_boxes`) with values -1, 0, 1, 2, 3.

    Raises:
        ValueError: bad grid arguments, ``min_pixels`` < 1, an unknown lesion
            code, or a mask that is not (size, size).
    """
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, numbers.Integral):
        raise ValueError(f"min_pixels must be an integer, got {min_pixels!r}")
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
    positions = np.asarray(grid_positions(size, patch, overlap))
    n = len(positions)
    counts = {code: np.zeros((n, n), dtype=np.int64) for code in (*LESION_CLASSES, "SE")}
    for code, mask in masks.items():
        if code in _IGNORED_MASKS:
            continue
        if code not in counts:
            raise ValueError(
                f"unknown lesion code {code!r}; expected one of {sorted(counts)} (or OD)"
            )
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"{code} mask must be 2-D (H, W), got shape {mask.shape}")
        _check_square(mask, size, f"{code} mask")
        counts[code] = _patch_counts(mask, positions, patch)
    lesion_counts = np.stack([counts[code] for code in LESION_CLASSES])  # (3, n, n)
    best = lesion_counts.argmax(axis=0)  # first maximum: ties go to the lower class
    best_count = lesion_counts.max(axis=0)
    labels = np.where(best_count >= min_pixels, best + 1, 0)
    only_soft_exudate = (best_count < min_pixels) & (counts["SE"] >= min_pixels)
    labels[only_soft_exudate] = EXCLUDED
    return labels.astype(np.int64)


def _as_channels_last(image, size: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    _check_square(image, size, "image")
    return image


def iter_patch_batches(
    image,
    size: int,
    patch: int = DEFAULT_PATCH,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 256,
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """Yield the grid's patches in batches, without holding them all at once.

    Args:
        image: (size, size) or (size, size, C) array.
        size: side of the square image.
        patch: side of a patch, in pixels.
        overlap: pixels shared by neighbouring patches.
        batch_size: patches per batch (the last batch may be smaller).

    Yields:
        ``(boxes, batch)``: the batch's top-left corners (y, x) in grid order
        and an array (len(boxes), patch, patch, C) of the image's dtype (C = 1
        for a 2-D image).

    Raises:
        ValueError: bad grid arguments, batch_size < 1, or an image that is
            not size x size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    boxes = grid_boxes(size, patch, overlap)
    image = _as_channels_last(image, size)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        yield chunk, np.stack([image[y : y + patch, x : x + patch] for y, x in chunk])


def extract_patches(
    image, size: int, patch: int = DEFAULT_PATCH, overlap: int = DEFAULT_OVERLAP
) -> np.ndarray:
    """All patches of the grid, in grid order (`grid_boxes`).

    At the defaults (800 px, 64 px patches, 32 px overlap) a 3-channel uint8
    image gives 576 patches, 7 MB; use `iter_patch_batches` to stream them.

    Args:
        image: (size, size) or (size, size, C) array.
        size: side of the square image.
        patch: side of a patch, in pixels.
        overlap: pixels shared by neighbouring patches.

    Returns:
        (n * n, patch, patch, C) array of the image's dtype (C = 1 for a 2-D image).

    Raises:
        ValueError: bad grid arguments or an image that is not size x size.
    """
    boxes = grid_boxes(size, patch, overlap)
    return next(iter_patch_batches(image, size, patch, overlap, batch_size=len(boxes)))[1]
