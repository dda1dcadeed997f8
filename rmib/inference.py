"""Sliding-window prediction of a full image from overlapping tiles.

The one tiling function every segmenter uses (MONAI / nnU-Net style): tiles
overlap by a fraction of their size, the last tile of each row and column is
flush with the image edge (no resized remainders), an image smaller than the
tile is padded, tiles are predicted in batches, and each prediction is
blended with a smooth weight window that has no zeros, so there are no seams.
Tiles are cut lazily: at most ``batch_size`` of them exist at any time, and
the blending weights are summed per axis, so a 4288x2848 photograph costs its
output array (plus a boolean field-of-view mask) and one batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

import numpy as np

PAD_MODES = ("reflect", "constant")
WINDOW_FLOOR = 1e-2  # smallest weight of a window axis profile (the centre has 1)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _tile_shape(tile) -> tuple[int, int]:
    if isinstance(tile, numbers.Integral) and not isinstance(tile, bool):
        tile = (tile, tile)
    try:
        th, tw = tile
    except (TypeError, ValueError):
        raise ValueError(f"tile must be an int or a (height, width) pair, got {tile!r}") from None
    return _check_positive_int("tile height", th), _check_positive_int("tile width", tw)


def tile_grid(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles along one axis: 0, stride, 2 * stride, ..., length - tile.

    The last tile is flush with the edge; it is added only when the regular
    offsets do not already end there. A tile at least as long as the axis
    gives ``[0]`` (the caller pads the image up to the tile).

    Example:
        >>> tile_grid(10, 4, 3)
        [0, 3, 6]
        >>> tile_grid(11, 4, 3)
        [0, 3, 6, 7]
    """
    length = _check_positive_int("length", length)
    tile = _check_positive_int("tile", tile)
    stride = _check_positive_int("stride", stride)
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def weight_window(tile, sigma_fraction: float = 0.125, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """Blending weights for one tile: a separable centred Gaussian, max 1, no zeros.

    Each axis is a Gaussian profile clipped below at ``floor`` and the window
    is their outer product (smallest weight ``floor ** 2`` at the corners).
    Keeping it separable keeps the blend separable: across a seam in x the
    result moves smoothly whatever the row.

    Args:
        tile: int or (height, width).
        sigma_fraction: Gaussian sigma as a fraction of the tile side (1/8, as nnU-Net).
        floor: smallest weight of each axis profile, in (0, 1].

    Returns:
        float32 array (height, width) with values in [floor ** 2, 1].
    """
    th, tw = _tile_shape(tile)
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    return np.outer(
        _profile(th, sigma_fraction, floor), _profile(tw, sigma_fraction, floor)
    ).astype(np.float32)


def _profile(size: int, sigma_fraction: float = 0.125, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """One axis of `weight_window`: a Gaussian with max 1, clipped below at `floor` (float64)."""
    offset = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    sigma = max(size * sigma_fraction, 1e-6)
    gaussian = np.exp(-0.5 * (offset / sigma) ** 2)
    return np.maximum(gaussian / gaussian.max(), floor)


def _axis_weight_sum(length: int, tile: int, starts: list[int]) -> np.ndarray:
    """Sum along one axis of the window profiles of tiles starting at `starts` (float64)."""
    total = np.zeros(length, np.float64)
    profile = _profile(tile)
    for start in starts:
        total[start : start + tile] += profile
    return total


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_tiled(
    predict_fn: Callable,
    image,
    tile,
    overlap: float,
    batch_size: int,
    with_boxes: bool = False,
    mask=None,
    *,
    pad_mode: str = "reflect",
) -> np.ndarray:
    """Predict a whole image with a model that takes fixed-size tiles.

    Args:
        predict_fn: ``(B, th, tw, C) float32 -> (B, th, tw, K)``, or with
            ``with_boxes`` ``(tiles, boxes) -> (B, th, tw, K)``; may return
            NumPy arrays or tensors. Tiles carry the image's values as float32
            (uint8 images are not rescaled: preprocessing is the model's job).
        image: (H, W, C) array, float or uint8.
        tile: tile size, an int or (th, tw).
        overlap: fraction of a tile shared with its neighbour, in [0, 1);
            stride = tile - round(overlap * tile) (at least 1).
        batch_size: tiles per call of ``predict_fn`` (and the most that exist at once).
        with_boxes: also pass each tile's box, float32 (B, 4) normalised
            (y0, x0, y1, x1) with respect to the unpadded image, y0 = top / H,
            y1 = (top + th) / H; y1 or x1 exceed 1 when the image is smaller
            than the tile and was padded.
        mask: optional (H, W) field-of-view mask; the output is 0 where it is 0,
            and tiles lying wholly outside it are not predicted.
        pad_mode: "reflect" or "constant" (zeros), to pad an image smaller than the tile.

    Returns:
        float32 array (H, W, K): the window-weighted mean of the overlapping tile predictions.

    Raises:
        ValueError: a bad tile, overlap, batch size, pad mode, image or mask
            shape, or a prediction of the wrong shape.

    Example:
        >>> probs = predict_tiled(model.predict_on_batch, image, 160, 0.5, 8, mask=fov)
    """
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"image must be (H, W, C) with no empty axis, got shape {image.shape}")
    th, tw = _tile_shape(tile)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    batch_size = _check_positive_int("batch_size", batch_size)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    height, width = image.shape[:2]
    inside = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != (height, width):
            raise ValueError(f"mask is {mask.shape} but the image is {(height, width)}")
        inside = mask  # nonzero = inside; no boolean copy of a whole photograph

    padded_h, padded_w = max(height, th), max(width, tw)
    if (padded_h, padded_w) != (height, width):
        pad = ((0, padded_h - height), (0, padded_w - width), (0, 0))
        image = np.pad(image, pad, mode=pad_mode)
    stride_y = max(1, th - round(overlap * th))
    stride_x = max(1, tw - round(overlap * tw))
    starts_y = tile_grid(padded_h, th, stride_y)
    starts_x = tile_grid(padded_w, tw, stride_x)
    positions = [(y, x) for y in starts_y for x in starts_x]
    if inside is not None:
        # Fundus corners are black: skip tiles with no field-of-view pixel (their
        # output would be zeroed anyway), but keep one to learn the output depth.
        in_view = [(y, x) for y, x in positions if inside[y : y + th, x : x + tw].any()]
        positions = in_view or positions[:1]

    window = weight_window((th, tw))
    output = None
    for batch in _batches(positions, batch_size):
        tiles = np.stack([image[y : y + th, x : x + tw] for y, x in batch]).astype(np.float32)
        if with_boxes:
            boxes = np.array(
                [[y / height, x / width, (y + th) / height, (x + tw) / width] for y, x in batch],
                dtype=np.float32,
            )
            prediction = predict_fn(tiles, boxes)
        else:
            prediction = predict_fn(tiles)
        prediction = np.asarray(prediction, dtype=np.float32)
        if prediction.ndim != 4 or prediction.shape[:3] != (len(batch), th, tw):
            raise ValueError(
                f"predict_fn returned shape {prediction.shape} for {len(batch)} tiles of "
                f"{th}x{tw}; expected ({len(batch)}, {th}, {tw}, K)"
            )
        if output is None:
            output = np.zeros((padded_h, padded_w, prediction.shape[-1]), dtype=np.float32)
        elif prediction.shape[-1] != output.shape[-1]:
            raise ValueError(
                f"predict_fn returned {prediction.shape[-1]} channels, earlier {output.shape[-1]}"
            )
        for (y, x), tile_prediction in zip(batch, prediction, strict=True):
            output[y : y + th, x : x + tw] += tile_prediction * window[:, :, None]
        del tiles, prediction

    # The summed window weights are separable too: Sy(y) * Sx(x) over the full
    # grid. The skipped tiles hold no field-of-view pixel, so wherever the
    # output is kept every tile covering the pixel was predicted. Dividing by the
    # two axis sums in place needs no image-sized weight array (memory: the
    # output is the only image-sized float array).
    output = output[:height, :width]
    output /= _axis_weight_sum(padded_h, th, starts_y)[:height, None, None].astype(np.float32)
    output /= _axis_weight_sum(padded_w, tw, starts_x)[None, :width, None].astype(np.float32)
    if inside is not None:
        # Strip by strip, without the image-sized boolean and index arrays that
        # `output[mask == 0] = 0` would build.
        step = max(1, (1 << 16) // width)
        for top in range(0, height, step):
            rows = slice(top, top + step)
            np.copyto(output[rows], 0.0, where=(inside[rows] == 0)[:, :, None])
    return np.ascontiguousarray(output)


__all__ = ["predict_tiled", "tile_grid", "weight_window"]
