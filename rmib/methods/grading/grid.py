"""The overlapping patch grid of the two-stage DR grader (Yang et al., MICCAI 2017).

The paper divides a d x d fundus image into h x h patches with stride h - ov
and counts s = floor((d - h) / (h - ov)) patches per side, which leaves a strip
at the right and bottom edges uncovered whenever (d - h) is not a multiple of
the stride. rmib adds one last patch flush with the edge instead, so every
pixel lies in at least one patch. Defaults (the paper gives none): h = 64,
ov = 32 at d = 800.
"""

from __future__ import annotations

import numbers

DEFAULT_SIZE = 800
DEFAULT_PATCH = 64
DEFAULT_OVERLAP = 32


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
    return int(value)


def grid_positions(size: int, patch: int, overlap: int) -> list[int]:
    """Top-left offsets of the patches along one side of a square image.

    Offsets are 0, stride, 2 * stride, ... (stride = patch - overlap) while the
    patch fits, plus a last one at ``size - patch`` (flush with the edge) when
    the regular offsets do not already end there.

    Args:
        size: side of the square image, in pixels.
        patch: side of a square patch, in pixels (``h`` in the paper).
        overlap: pixels shared by two neighbouring patches (``ov`` in the
            paper), ``0 <= overlap < patch``.

    Returns:
        Sorted list of distinct offsets; the first is 0 and the last is
        ``size - patch``.

    Raises:
        ValueError: a non-integer or non-positive size or patch, a patch larger
            than the image, or an overlap outside ``[0, patch)``.

    Example:
        >>> grid_positions(100, 64, 32)
        [0, 32, 36]
    """
    size = _check_int("size", size)
    patch = _check_int("patch", patch)
    overlap = _check_int("overlap", overlap)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if patch < 1:
        raise ValueError(f"patch must be positive, got {patch}")
    if patch > size:
        raise ValueError(f"patch ({patch} px) must not be larger than the image ({size} px)")
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap must be in [0, patch) = [0, {patch}) pixels, got {overlap}")
    stride = patch - overlap
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


def grid_boxes(size: int, patch: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of every patch of the square grid, row-major.

    Cell ``(i, j)`` of an (n, n) label or probability map is entry ``i * n + j``.

    Args:
        size: side of the square image, in pixels.
        patch: side of a square patch, in pixels.
        overlap: pixels shared by two neighbouring patches.

    Returns:
        ``n * n`` pairs ``(y, x)`` with ``n = len(grid_positions(size, patch, overlap))``.

    Raises:
        ValueError: as `grid_positions`.
    """
    positions = grid_positions(size, patch, overlap)
    return [(y, x) for y in positions for x in positions]
