"""Test-time augmentation: a photograph's probability map averaged over its flips and quarter turns.

`predict_with_tta(predict, image, fov, tta)` predicts the photograph as each
transform of `tta` moves it (its field of view moved alike), moves each
probability map back to the photograph's orientation and returns their mean:

- ``"none"``: the photograph as it is (one pass, no copy);
- ``"flips"``: the photograph, its horizontal flip, its vertical flip and both
  (4 passes);
- ``"flips-rot90"``: those and the same of the photograph turned a quarter
  (transposed), i.e. all 8 symmetries of the square (8 passes); a model whose
  input must keep the photograph's orientation refuses it (e.g. Dual2Net with
  a non-square input size).

The whole photograph is moved, not each tile: a tiled segmenter tiles the
moved photograph afresh (its grid, whose last tile is flush with the edge,
lies differently on the content) and a segmenter with global context (the
local-global U-Net's GlobalNet) sees the moved photograph too. A transform
is (flip rows, flip columns, transpose), applied in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rmib.choices import TTA
from rmib.errors import RmibError

Transform = tuple[bool, bool, bool]  # (flip rows = vertical flip, flip columns, transpose)
IDENTITY: Transform = (False, False, False)
_FLIPS: tuple[Transform, ...] = (
    IDENTITY,
    (False, True, False),
    (True, False, False),
    (True, True, False),
)
TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": (IDENTITY,),
    "flips": _FLIPS,
    "flips-rot90": _FLIPS + tuple((rows, cols, True) for rows, cols, _ in _FLIPS),
}
assert tuple(TRANSFORMS) == TTA, "rmib.choices.TTA names the transform sets"


def check_tta(tta) -> str:
    """`tta` if it is one of `rmib.choices.TTA`.

    Raises:
        RmibError: naming the value and the choices.
    """
    if not isinstance(tta, str) or tta not in TRANSFORMS:
        raise RmibError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
    return tta


def transforms(tta: str) -> tuple[Transform, ...]:
    """The transforms of a `tta` choice, the identity first (one forward pass each)."""
    return TRANSFORMS[check_tta(tta)]


def turns(tta: str) -> bool:
    """Whether `tta` turns the photograph a quarter (swaps its height and width)."""
    return any(transpose for _, _, transpose in transforms(tta))


def apply_transform(array, transform: Transform) -> np.ndarray:
    """`array` (H, W, ...) flipped, then transposed, as `transform` says (a view)."""
    flip_rows, flip_cols, transpose = transform
    axes = tuple(axis for axis, flip in ((0, flip_rows), (1, flip_cols)) if flip)
    array = np.flip(array, axis=axes) if axes else np.asarray(array)
    return array.swapaxes(0, 1) if transpose else array


def undo_transform(array, transform: Transform) -> np.ndarray:
    """The inverse of `apply_transform`: transposed back, then flipped back (a view)."""
    flip_rows, flip_cols, transpose = transform
    array = np.asarray(array).swapaxes(0, 1) if transpose else np.asarray(array)
    axes = tuple(axis for axis, flip in ((0, flip_rows), (1, flip_cols)) if flip)
    return np.flip(array, axis=axes) if axes else array


def predict_with_tta(
    predict: Callable, image: np.ndarray, fov: np.ndarray | None = None, tta: str = "none"
) -> np.ndarray:
    """The mean of `predict`'s maps of the transforms of `image`, each moved back.

    Args:
        predict: ``(image (h, w, C), fov (h, w) or None) -> (h, w)`` probability map.
        image: (H, W, C) photograph.
        fov: optional (H, W) field-of-view mask, moved with the photograph.
        tta: one of `rmib.choices.TTA`.

    Returns:
        float32 (H, W): ``predict(image, fov)`` itself with "none"; otherwise the
        mean over the transforms, summed in float64 (a map that every transform
        leaves unchanged comes back exactly).

    Raises:
        RmibError: an unknown `tta`, or a map of the wrong shape.
    """
    steps = transforms(tta)
    if steps == (IDENTITY,):
        return predict(image, fov)
    image = np.asarray(image)
    total = np.zeros(image.shape[:2], np.float64)
    for step in steps:
        # Contiguous copies: OpenCV (resizing, preprocessing) refuses negative strides.
        moved = np.ascontiguousarray(apply_transform(image, step))
        moved_fov = None if fov is None else np.ascontiguousarray(apply_transform(fov, step))
        prob = undo_transform(predict(moved, moved_fov), step)
        if prob.shape != total.shape:
            raise RmibError(
                f"test-time augmentation: the map of a {moved.shape[0]}x{moved.shape[1]} "
                f"image came back {prob.shape}, expected {total.shape}"
            )
        total += prob
        del moved, moved_fov, prob
    total /= len(steps)
    return total.astype(np.float32)


__all__ = [
    "IDENTITY",
    "TRANSFORMS",
    "apply_transform",
    "check_tta",
    "predict_with_tta",
    "transforms",
    "turns",
    "undo_transform",
]
