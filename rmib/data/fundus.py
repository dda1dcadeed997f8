"""Fundus photograph preprocessing: field of view, CLAHE, Graham, crops and resizing.

Every function takes and returns NumPy arrays (uint8 RGB photographs, uint8
0/1 masks); OpenCV does the pixel work.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from rmib.choices import PREPROCESSING as PREPROCESSING_METHODS
from rmib.errors import RmibError

# IDRiD photographs are 4288 wide x 2848 high; Yan et al. crop the centre
# 3328 x 2816 (width x height) before tiling.
IDRID_CROP_SHAPE = (2816, 3328)

# The FOV is found on a copy no larger than this (pixels along the longer
# side): the disc edge is a large, smooth structure, and 12-Mpx photographs
# would otherwise make the morphology slow.
_FOV_WORKING_SIZE = 1024


def _check_image(image, name="image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"{name} must be a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: {image.shape}")
    return image


def fov_mask(image: np.ndarray) -> np.ndarray:
    """The circular field of view of a fundus photograph.

    The brightest channel is median-filtered (sensor noise, JPEG blocks) and
    thresholded relative to the photograph's own intensity range: the dark
    surround is the low percentile, the retina the high one, and the
    threshold sits 15% of the way up. An opening removes text and noise in
    the border, the largest component is kept and its holes are filled (dark
    lesions or a dark fovea are inside the field of view).

    A photograph without a dark surround (a flat or fully cropped image) is
    all field of view.

    Args:
        image: uint8 RGB (H, W, 3).

    Returns:
        uint8 (H, W) mask, 1 inside the field of view.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    scale = min(1.0, _FOV_WORKING_SIZE / max(height, width))
    small = image
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    side = max(small.shape[:2])
    # A median removes noise and JPEG ringing without moving the disc's edge.
    brightness = cv2.medianBlur(np.ascontiguousarray(small.max(axis=2)), 5 if side >= 64 else 3)
    low, high = np.percentile(brightness, [1, 95])
    if high - low < 10:
        return np.ones((height, width), np.uint8)
    threshold = low + max(5.0, 0.15 * (high - low))
    mask = (brightness > threshold).astype(np.uint8)

    radius = max(1, side // 200)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.ones((height, width), np.uint8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == largest).astype(np.uint8)
    mask = _fill_holes(mask)

    if scale < 1.0:
        mask = cv2.resize(mask * 255, (width, height), interpolation=cv2.INTER_LINEAR)
        mask = (mask >= 128).astype(np.uint8)
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # Flood the background from outside (a one-pixel frame guarantees a
    # connected seed); whatever background the flood misses is a hole.
    padded = np.pad(mask, 1)
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    filled = padded.copy()
    cv2.floodFill(filled, flood, (0, 0), 1)
    holes = filled == 0
    padded[holes] = 1
    return padded[1:-1, 1:-1]


def fov_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (y0, x0, y1, x1) of the field of view, ends exclusive."""
    return _mask_box(fov_mask(image))


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, mask.shape[0], mask.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def crop_to_box(array: np.ndarray, box) -> np.ndarray:
    """`array[y0:y1, x0:x1]` for an image (H, W, C) or a mask (H, W), box checked.

    Raises:
        ValueError: a box that is empty or reaches outside the array.
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    height, width = np.shape(array)[:2]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"box {tuple(box)} is empty or outside an array of {height}x{width} (HxW)")
    return array[y0:y1, x0:x1]


def fov_crop(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop a photograph to its field of view.

    Returns:
        (cropped image, box): crop the masks with `crop_to_box(mask, box)`.
    """
    box = fov_box(image)
    return crop_to_box(image, box), box


def clahe(image: np.ndarray, clip: float = 1.5, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the LAB lightness.

    Colour (the A and B channels) is left as it is, so lesion hues survive.

    Args:
        image: uint8 RGB (H, W, 3).
        clip: OpenCV's clip limit.
        tiles: the grid is tiles x tiles.

    Returns:
        uint8 RGB of the same shape.
    """
    image = _check_image(image)
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    equaliser = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tiles), int(tiles)))
    lab[:, :, 0] = equaliser.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def graham(image: np.ndarray, sigma: float = 10) -> np.ndarray:
    """Graham's local-contrast normalisation, I = 4 I - 4 G_sigma * I + 128.

    Yang et al. (MICCAI 2017), eq. 1, after B. Graham's Kaggle solution.
    `sigma` is given at the 800 px scale of the paper and scaled with the
    image: sigma_eff = sigma * max(H, W) / 800.

    Args:
        image: uint8 RGB (H, W, 3).
        sigma: Gaussian scale at 800 px.

    Returns:
        uint8 RGB of the same shape, clipped to [0, 255].
    """
    image = _check_image(image)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    sigma_eff = sigma * max(image.shape[:2]) / 800.0
    pixels = image.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), sigma_eff)
    out = 4.0 * pixels - 4.0 * blurred + 128.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def idrid_centre_box(shape) -> tuple[int, int, int, int]:
    """Box (y0, x0, y1, x1) of the centre 2816 x 3328 (H x W) of an IDRiD-sized array.

    Raises:
        RmibError: the array is smaller than 2816 x 3328.
    """
    height, width = shape[:2]
    crop_h, crop_w = IDRID_CROP_SHAPE
    if height < crop_h or width < crop_w:
        raise RmibError(
            f"IDRiD centre crop needs an image of at least {crop_w}x{crop_h} (width x height), "
            f"got {width}x{height}; IDRiD photographs are 4288x2848"
        )
    y0 = (height - crop_h) // 2
    x0 = (width - crop_w) // 2
    return y0, x0, y0 + crop_h, x0 + crop_w


def idrid_centre_crop(array: np.ndarray) -> np.ndarray:
    """The centre 2816 high x 3328 wide of an IDRiD photograph or mask (Yan et al. 2019).

    For a 2848 x 4288 photograph these are rows 16..2832 and columns 480..3808.

    Raises:
        RmibError: the array is smaller than 2816 x 3328.
    """
    return crop_to_box(array, idrid_centre_box(np.shape(array)))


@dataclasses.dataclass(frozen=True)
class ResizeTransform:
    """How `resize_pad` placed an image in its output, to undo it.

    Attributes:
        scale: output pixels per input pixel (same along both axes).
        top, left: padding before the resized image.
        height, width: size of the resized image inside the padding.
        original_height, original_width: size of the input.
    """

    scale: float
    top: int
    left: int
    height: int
    width: int
    original_height: int
    original_width: int


def _resize(array: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8)
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    if array.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
        out = out[:, :, None]
    return out


def resize_pad(
    image: np.ndarray, size, interpolation: int = cv2.INTER_AREA, pad_value=0
) -> tuple[np.ndarray, ResizeTransform]:
    """Resize keeping the aspect ratio so the image fits `size`, then pad to it, centred.

    Args:
        image: (H, W) or (H, W, C) array (masks: pass `cv2.INTER_NEAREST`).
        size: side of the square output, or (height, width).
        interpolation: OpenCV interpolation flag.
        pad_value: value of the padding.

    Returns:
        (out, transform): give `transform` to `unresize_pad` to map a
        prediction on `out` back onto the input.
    """
    target_h, target_w = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if target_h < 1 or target_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = image.shape[:2]
    scale = min(target_h / height, target_w / width)
    new_h = min(target_h, max(1, round(height * scale)))
    new_w = min(target_w, max(1, round(width * scale)))
    resized = _resize(image, new_w, new_h, interpolation)
    top = (target_h - new_h) // 2
    left = (target_w - new_w) // 2
    pad = [(top, target_h - new_h - top), (left, target_w - new_w - left)]
    pad += [(0, 0)] * (resized.ndim - 2)
    out = np.pad(resized, pad, mode="constant", constant_values=pad_value)
    transform = ResizeTransform(float(scale), top, left, new_h, new_w, height, width)
    return out, transform


def unresize_pad(
    array: np.ndarray,
    transform: ResizeTransform,
    original_shape=None,
    interpolation=cv2.INTER_LINEAR,
) -> np.ndarray:
    """Map an array aligned with `resize_pad`'s output back to the input's size.

    Args:
        array: (h, w) or (h, w, K), e.g. a probability map (masks: `cv2.INTER_NEAREST`).
        transform: what `resize_pad` returned.
        original_shape: (H, W, ...) of the input; defaults to the transform's.
        interpolation: OpenCV interpolation flag.
    """
    if original_shape is None:
        original_shape = (transform.original_height, transform.original_width)
    height, width = int(original_shape[0]), int(original_shape[1])
    inner = array[
        transform.top : transform.top + transform.height,
        transform.left : transform.left + transform.width,
    ]
    return _resize(np.ascontiguousarray(inner), width, height, interpolation)


def scaled_shape(shape, scale: float) -> tuple[int, int]:
    """(height, width) of an array of `shape` resized by `scale` (each side at least 1).

    Raises:
        RmibError: `scale` is not in (0, 1].
    """
    check_scale(scale)
    height, width = shape[:2]
    return max(1, round(height * scale)), max(1, round(width * scale))


def check_scale(scale) -> float:
    """`scale` as a float, or a user error unless 0 < scale <= 1."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(scale, bool) or not 0.0 < value <= 1.0:
        raise RmibError(
            f"scale must be a number in (0, 1] (the working resolution as a fraction of the "
            f"photograph's, e.g. 0.5), got {scale!r}"
        )
    return value


def rescale(array: np.ndarray, scale: float, kind: str = "image") -> np.ndarray:
    """Resize a photograph, a lesion mask or a field-of-view mask by `scale`.

    Photographs are shrunk with INTER_AREA; masks (uint8 0/1) are area-averaged
    and a pixel is kept where at least half of the area it covers is lesion,
    so a lesion a few pixels wide shrinks instead of being sampled away as
    nearest-neighbour would. `scale == 1` returns `array` itself.

    Args:
        array: (H, W, 3) uint8 photograph or (H, W) uint8 0/1 mask.
        scale: in (0, 1].
        kind: "image" or "mask".

    Returns:
        the resized array, same dtype.
    """
    if check_scale(scale) == 1.0:
        return array
    height, width = scaled_shape(array.shape, scale)
    if kind == "image":
        return _resize(np.asarray(array), width, height, cv2.INTER_AREA)
    if kind != "mask":
        raise ValueError(f'kind must be "image" or "mask", got {kind!r}')
    spread = np.asarray(array, np.uint8) * np.uint8(255)
    area = cv2.resize(spread, (width, height), interpolation=cv2.INTER_AREA)
    return (area >= 128).astype(np.uint8)


def unscale_probability(prob: np.ndarray, shape) -> np.ndarray:
    """A probability map predicted at a working scale, resized back (bilinear) to `shape`."""
    height, width = shape[:2]
    prob = np.asarray(prob, np.float32)
    if prob.shape[:2] == (height, width):
        return prob
    out = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0, out=out)


def preprocess(image: np.ndarray, method: str) -> np.ndarray:
    """Apply the named intensity preprocessing ("none", "clahe" or "graham").

    The name is what run and export metadata store, so a model is always fed
    the way it was trained.

    Raises:
        RmibError: an unknown method.
    """
    if method == "none":
        return _check_image(image)
    if method == "clahe":
        return clahe(image)
    if method == "graham":
        return graham(image)
    raise RmibError(
        f"unknown preprocessing {method!r}; expected one of {', '.join(PREPROCESSING_METHODS)}"
    )
