"""Sliding-window prediction of a full image from overlapping tiles.

The one tiling function every segmenter uses (MONAI / nnU-Net style): tiles
overlap by a fraction of their size, the last tile of each row and column is
flush with the image edge (no resized remainders), an image smaller than the
tile is padded, tiles are predicted in batches, and each prediction is
blended with a smooth weight window that has no zeros, so there are no seams.
Tiles are cut lazily: at most ``batch_size`` of them exist at any time, and
the blending weights are summed per axis, so a 4288x2848 photograph costs its
output array (plus a boolean field-of-view mask) and one batch.

A fully convolutional model can take tiles much larger than its training
patch. `plan_tiles` picks the fewest, most even tiles of at most a given area
that cover an image (or the field of view's bounding box, ``region``) with a
fixed overlap in pixels, and the ``"ramp"`` window hands each pixel of an
overlap smoothly from one tile to the next, so that the pixels a tile
contributes most to lie at least half an overlap away from its border (where
zero padding changes a convolutional network's output).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

import numpy as np

PAD_MODES = ("reflect", "constant")
WINDOWS = ("gaussian", "ramp")
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


def ramp_profile(size: int, ramp: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """One axis of the ``"ramp"`` window: 1 inside, a raised cosine over `ramp` pixels at each end.

    Pixel ``d`` from the nearer end (0-based) weighs
    ``floor + (1 - floor) * (1 - cos(pi * (d + 0.5) / ramp)) / 2`` when ``d < ramp``
    and 1 beyond. Two tiles overlapping by ``ramp`` pixels weigh each pixel of
    the overlap ``w`` and ``1 - w + floor`` (the cosine is symmetric), so the
    blend moves from one tile to the other across the overlap and a pixel gets
    most of its value from the tile whose border is farther away.

    Example:
        >>> ramp_profile(6, 2, floor=0.0).round(3).tolist()
        [0.146, 0.854, 1.0, 1.0, 0.854, 0.146]
    """
    size = _check_positive_int("size", size)
    if isinstance(ramp, bool) or not isinstance(ramp, numbers.Integral) or ramp < 0:
        raise ValueError(f"ramp must be a non-negative integer, got {ramp!r}")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    distance = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float64)
    profile = np.ones(size, np.float64)
    if ramp:
        rising = distance < ramp
        cosine = 0.5 * (1.0 - np.cos(np.pi * (distance[rising] + 0.5) / ramp))
        profile[rising] = floor + (1.0 - floor) * cosine
    return np.maximum(profile, floor) if floor > 0 else profile


def _axis_profile(size: int, window: str, overlap: int) -> np.ndarray:
    if window == "ramp":
        return ramp_profile(size, min(overlap, size // 2))
    return _profile(size)


def plan_tiles(
    height: int, width: int, max_pixels: int, overlap: int, multiple: int = 1
) -> tuple[int, int]:
    """The tile (th, tw) that covers an image with the fewest, most even tiles.

    Tiles hold at most `max_pixels` pixels, both sides are multiples of
    `multiple` (a network's required multiple, e.g. 32), and neighbours
    overlap by at least `overlap` pixels. Among the tilings with the fewest
    predicted pixels (tiles x tile area) the one with the fewest tiles wins. A
    side that fits in one tile gets one tile, rounded up to the multiple
    (`predict_tiled` pads the image). With the result, ``predict_tiled(...,
    tile=(th, tw), overlap=overlap)`` lays ``ny x nx`` tiles whose last tile is
    flush with the edge.

    Args:
        height, width: the image (or region) to cover.
        max_pixels: the largest tile area (memory of one tile through the model).
        overlap: pixels shared by neighbouring tiles (>= 0).
        multiple: both tile sides are multiples of it.

    Returns:
        (th, tw).

    Raises:
        ValueError: a non-positive size or multiple, a negative overlap, or a
            `max_pixels` too small for a tile of `overlap + multiple` pixels a side.

    Example:
        >>> plan_tiles(2848, 3500, 1024 * 1024, 128, multiple=32)
        (1056, 992)
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    multiple = _check_positive_int("multiple", multiple)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral) or overlap < 0:
        raise ValueError(f"overlap must be a non-negative integer of pixels, got {overlap!r}")

    def round_up(value: float) -> int:
        return int(-(-int(np.ceil(value)) // multiple) * multiple)

    smallest = round_up(overlap + 1)
    if smallest * smallest > max_pixels:
        raise ValueError(
            f"max_pixels {max_pixels} is too small for tiles overlapping by {overlap} pixels "
            f"(the smallest useful tile is {smallest}x{smallest} = {smallest * smallest} pixels)"
        )

    def side(length: int, count: int) -> int:
        """Side of `count` tiles covering `length` with the overlap (rounded up)."""
        if count == 1:
            return round_up(length)
        return round_up((length + (count - 1) * overlap) / count)

    def count_for(length: int, limit: int) -> int | None:
        """Fewest tiles of side <= limit covering `length`; None if impossible."""
        if round_up(length) <= limit:
            return 1
        if limit - overlap < 1:
            return None
        count = max(2, -(-(length - overlap) // (limit - overlap)))
        while side(length, count) > limit:  # rounding up to the multiple can overshoot
            count += 1
            if count > length:
                return None
        return count

    best = None
    rows_max = -(-height // max(1, smallest - overlap)) + 1
    for rows in range(1, rows_max + 1):
        th = side(height, rows)
        if th * smallest > max_pixels:
            continue
        limit = (max_pixels // th) // multiple * multiple
        cols = count_for(width, limit)
        if cols is None:
            continue
        tw = side(width, cols)
        key = (rows * cols * th * tw, rows * cols, abs(th - tw))
        if best is None or key < best[0]:
            best = (key, (th, tw))
        if th == round_up(overlap + 1):
            break
    if best is None:  # pragma: no cover - smallest x smallest always fits
        raise ValueError(f"no tiling of {height}x{width} within {max_pixels} pixels per tile")
    return best[1]


def mask_box(mask) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, x0, y1, x1) of a mask's non-zero pixels (y1, x1 exclusive); None if empty.

    Example:
        >>> m = np.zeros((5, 6), np.uint8); m[1:3, 2:5] = 1
        >>> mask_box(m)
        (1, 2, 3, 5)
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _axis_weight_sum(
    length: int, tile: int, starts: list[int], window: str = "gaussian", overlap: int = 0
) -> np.ndarray:
    """Sum along one axis of the window profiles of tiles starting at `starts` (float64)."""
    total = np.zeros(length, np.float64)
    profile = _axis_profile(tile, window, overlap)
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
    window: str = "gaussian",
    region=None,
) -> np.ndarray:
    """Predict a whole image with a model that takes fixed-size tiles.

    Args:
        predict_fn: ``(B, th, tw, C) float32 -> (B, th, tw, K)``, or with
            ``with_boxes`` ``(tiles, boxes) -> (B, th, tw, K)``; may return
            NumPy arrays or tensors. Tiles carry the image's values as float32
            (uint8 images are not rescaled: preprocessing is the model's job).
        image: (H, W, C) array, float or uint8.
        tile: tile size, an int or (th, tw).
        overlap: what neighbouring tiles share: a fraction of the tile in
            [0, 1) (a float; stride = tile - round(overlap * tile), at least 1)
            or a number of pixels (an int; at most the tile side - 1 is used).
        batch_size: tiles per call of ``predict_fn`` (and the most that exist at once).
        with_boxes: also pass each tile's box, float32 (B, 4) normalised
            (y0, x0, y1, x1) with respect to the unpadded image, y0 = top / H,
            y1 = (top + th) / H; y1 or x1 exceed 1 when the image is smaller
            than the tile and was padded.
        mask: optional (H, W) field-of-view mask; the output is 0 where it is 0,
            and tiles lying wholly outside it are not predicted.
        pad_mode: "reflect" or "constant" (zeros), to pad an image smaller than the tile.
        window: blending weights of a tile: "gaussian" (nnU-Net's, sigma 1/8 of
            the tile; suited to large overlaps) or "ramp" (`ramp_profile`: flat,
            with a raised-cosine ramp as wide as the overlap; suited to large
            tiles with a small overlap).
        region: optional (y0, x0, y1, x1) box (y1, x1 exclusive): tiles cover only
            this part of the image (e.g. the field of view's `mask_box`) and the
            output is 0 outside it; boxes stay relative to the whole image.

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
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise ValueError(f"overlap must be a fraction in [0, 1) or pixels, got {overlap!r}")
    if isinstance(overlap, numbers.Integral):
        if overlap < 0:
            raise ValueError(f"overlap of {overlap} pixels must be >= 0")
        overlap_y, overlap_x = min(int(overlap), th - 1), min(int(overlap), tw - 1)
    elif not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    else:
        overlap_y, overlap_x = round(overlap * th), round(overlap * tw)
    batch_size = _check_positive_int("batch_size", batch_size)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    full_h, full_w = image.shape[:2]
    inside = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != (full_h, full_w):
            raise ValueError(f"mask is {mask.shape} but the image is {(full_h, full_w)}")
        inside = mask  # nonzero = inside; no boolean copy of a whole photograph
    top, left, bottom, right = 0, 0, full_h, full_w
    if region is not None:
        try:
            top, left, bottom, right = (int(v) for v in region)
        except (TypeError, ValueError):
            raise ValueError(f"region must be (y0, x0, y1, x1), got {region!r}") from None
        if not (0 <= top < bottom <= full_h and 0 <= left < right <= full_w):
            raise ValueError(
                f"region {tuple(region)} must be a non-empty box inside the {full_h}x{full_w} image"
            )
    image = image[top:bottom, left:right]  # views: no copy of the photograph
    if inside is not None:
        inside = inside[top:bottom, left:right]
    height, width = image.shape[:2]

    padded_h, padded_w = max(height, th), max(width, tw)
    if (padded_h, padded_w) != (height, width):
        pad = ((0, padded_h - height), (0, padded_w - width), (0, 0))
        image = np.pad(image, pad, mode=pad_mode)
    stride_y = max(1, th - overlap_y)
    stride_x = max(1, tw - overlap_x)
    starts_y = tile_grid(padded_h, th, stride_y)
    starts_x = tile_grid(padded_w, tw, stride_x)
    positions = [(y, x) for y in starts_y for x in starts_x]
    if inside is not None:
        # Fundus corners are black: skip tiles with no field-of-view pixel (their
        # output would be zeroed anyway), but keep one to learn the output depth.
        in_view = [(y, x) for y, x in positions if inside[y : y + th, x : x + tw].any()]
        positions = in_view or positions[:1]

    profile_y = _axis_profile(th, window, overlap_y)
    profile_x = _axis_profile(tw, window, overlap_x)
    weights = np.outer(profile_y, profile_x).astype(np.float32)
    output = None
    for batch in _batches(positions, batch_size):
        tiles = np.stack([image[y : y + th, x : x + tw] for y, x in batch]).astype(np.float32)
        if with_boxes:
            boxes = np.array(
                [
                    [
                        (top + y) / full_h,
                        (left + x) / full_w,
                        (top + y + th) / full_h,
                        (left + x + tw) / full_w,
                    ]
                    for y, x in batch
                ],
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
            depth = prediction.shape[-1]
            if (padded_h, padded_w) == (height, width):
                # The whole image's output, written through a view of the region.
                whole = np.zeros((full_h, full_w, depth), dtype=np.float32)
                output = whole[top:bottom, left:right]
            else:  # an image smaller than the tile: blend padded, copy out at the end
                whole = None
                output = np.zeros((padded_h, padded_w, depth), dtype=np.float32)
        elif prediction.shape[-1] != output.shape[-1]:
            raise ValueError(
                f"predict_fn returned {prediction.shape[-1]} channels, earlier {output.shape[-1]}"
            )
        for (y, x), tile_prediction in zip(batch, prediction, strict=True):
            output[y : y + th, x : x + tw] += tile_prediction * weights[:, :, None]
        del tiles, prediction

    # The summed window weights are separable too: Sy(y) * Sx(x) over the full
    # grid. The skipped tiles hold no field-of-view pixel, so wherever the
    # output is kept every tile covering the pixel was predicted. Dividing by the
    # two axis sums in place needs no image-sized weight array (memory: the
    # output is the only image-sized float array).
    output = output[:height, :width]
    sum_y = _axis_weight_sum(padded_h, th, starts_y, window, overlap_y)
    sum_x = _axis_weight_sum(padded_w, tw, starts_x, window, overlap_x)
    output /= sum_y[:height, None, None].astype(np.float32)
    output /= sum_x[None, :width, None].astype(np.float32)
    if inside is not None:
        # Strip by strip, without the image-sized boolean and index arrays that
        # `output[mask == 0] = 0` would build.
        step = max(1, (1 << 16) // width)
        for row in range(0, height, step):
            rows = slice(row, row + step)
            np.copyto(output[rows], 0.0, where=(inside[rows] == 0)[:, :, None])
    if whole is None:
        whole = np.zeros((full_h, full_w, output.shape[-1]), dtype=np.float32)
        whole[top:bottom, left:right] = output
    return whole


__all__ = [
    "mask_box",
    "plan_tiles",
    "predict_tiled",
    "ramp_profile",
    "tile_grid",
    "weight_window",
]
