"""Image and mask IO, atomic writes, and the JSON / CSV files rmib writes.

Every image rmib reads goes through `read_image` / `read_mask`, so corrupt,
truncated, oversized or odd files (16-bit, grayscale, RGBA, non-ASCII paths)
are handled the same way everywhere; every JSON and CSV file it writes
(metrics.json, per_image.csv, skipped.csv, label tables) goes through
`write_json` / `write_csv` / `write_skipped`, atomically.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rmib.errors import BadInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif")
# A 4288x2848 IDRiD photograph is 12.2 Mpx; 100 Mpx leaves room for any
# fundus camera while refusing decompression bombs before decoding.
DEFAULT_MAX_PIXELS = 100_000_000
_max_pixels = DEFAULT_MAX_PIXELS

Image.MAX_IMAGE_PIXELS = None  # rmib checks the limit itself, with a clear message.


def set_max_pixels(limit: int | None) -> None:
    """Set the pixel limit above which images are refused before decoding."""
    global _max_pixels
    if limit is not None and limit < 1:
        raise ValueError(f"max_pixels must be positive, got {limit}")
    _max_pixels = limit or DEFAULT_MAX_PIXELS


def get_max_pixels() -> int:
    return _max_pixels


def is_image_file(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_size(path) -> tuple[int, int]:
    """(width, height) read from the file header, without decoding the pixels.

    Raises:
        BadInputError: missing file, unreadable header, or more pixels than the limit.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInputError(path, "is a folder, not an image file")
    if not path.is_file():
        raise BadInputError(path, "file not found")
    try:
        # PIL warns about odd headers (TIFF tags out of the file ...); the decoder decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                width, height = im.size
    except Exception as exc:  # PIL raises many types for bad headers
        raise BadInputError(path, f"not a readable image ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise BadInputError(path, f"image has an empty size {width}x{height}")
    if width * height > _max_pixels:
        raise BadInputError(
            path,
            f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{_max_pixels:,} (raise it with --max-pixels if the file is genuine)",
        )
    return width, height


def _decode(path: Path, flags: int) -> np.ndarray:
    image_size(path)  # header check and pixel limit before decoding
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile copes with non-ASCII paths
    if data.size == 0:
        raise BadInputError(path, "file is empty")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        # OpenCV decodes a truncated JPEG with a warning and grey rows; refuse it instead.
        tail = data[-64:].tobytes().rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            raise BadInputError(path, "truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(data, flags)
    if image is None or image.size == 0:
        raise BadInputError(path, "corrupt or truncated image: the decoder could not read it")
    if suffix == ".png" and not data[-12:].tobytes().startswith(b"\x00\x00\x00\x00IEND"):
        if b"IEND" not in data[-64:].tobytes():
            raise BadInputError(path, "truncated PNG (no IEND chunk)")
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)  # all-NaN: no warning
        hi = float(image.max()) if image.size else 1.0
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(image * scale, 0, 255).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def read_image(path) -> np.ndarray:
    """Decode an image file to a uint8 RGB array of shape (H, W, 3).

    Grayscale is repeated to three channels, alpha is dropped, 16-bit is
    scaled to 8-bit.

    Raises:
        BadInputError: naming the file, when it is missing, corrupt, truncated or too large.
    """
    path = Path(path)
    image = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION))
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image[:, :, ::-1])  # BGR -> RGB


def read_mask(path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a lesion mask to a uint8 array (H, W) of 0/1.

    Any non-zero pixel in any channel is lesion (IDRiD masks are RGB with the
    lesion in red; e-ophtha and DDR masks are single-channel).

    Args:
        path: the mask file.
        expected_shape: (H, W) of the image the mask belongs to, checked when given.

    Raises:
        BadInputError: unreadable mask, or one whose size differs from its image.
    """
    path = Path(path)
    mask = _decode(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        # A channel-wise OR is 20x faster than max(axis=2) on a 4288x2848 RGB mask.
        merged = mask[..., 0] > 0
        for c in range(1, mask.shape[2]):
            merged |= mask[..., c] > 0
        mask = merged.astype(np.uint8)
    else:
        mask = (mask > 0).astype(np.uint8)
    if expected_shape is not None and tuple(mask.shape[:2]) != tuple(expected_shape[:2]):
        h, w = expected_shape[:2]
        raise BadInputError(
            path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h} (width x height)",
        )
    return mask


def write_image(path, image: np.ndarray) -> None:
    """Write an RGB (H, W, 3) or single-channel image atomically (PNG/JPEG/TIFF by suffix)."""
    path = Path(path)
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]
    ok, buffer = cv2.imencode(path.suffix.lower() or ".png", np.ascontiguousarray(image))
    if not ok:
        raise BadInputError(path, "could not encode the image")
    with atomic_write(path, "wb") as f:
        f.write(buffer.tobytes())


# The temporary names of the atomic writers below: mkstemp/mkdtemp put 8 characters
# of [a-z0-9_] between prefix and suffix, giving ".<name>.XXXXXXXX.tmp" (atomic_write),
# ".<stem>.XXXXXXXX<suffix>" (atomic_path) and ".<name>.XXXXXXXX" (atomic_directory).
_TEMPORARY_NAME = re.compile(r"\.(?P<base>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]+)?")


def is_atomic_temporary(name: str) -> bool:
    """True when `name` has the form of the hidden temporary files of rmib's atomic writes.

    A process killed (SIGKILL, power loss) while writing leaves such a file
    behind; the file it was to replace is intact.
    """
    return _TEMPORARY_NAME.fullmatch(name) is not None


def remove_atomic_temporaries(directory, skip=()) -> list[Path]:
    """Delete the leftover temporary files of interrupted atomic writes below `directory`.

    Only regular files whose names match `is_atomic_temporary` are removed.
    Call it only when no other process writes there (e.g. when a run resumes).

    Args:
        directory: the folder to clean, with its subfolders.
        skip: subfolders not to enter (e.g. those other processes write).

    Returns:
        The paths removed.
    """
    directory = Path(directory)
    skipped = {Path(s).resolve() for s in skip}
    removed = []
    for root, folders, files in os.walk(directory):
        folders[:] = [f for f in folders if (Path(root) / f).resolve() not in skipped]
        for name in files:
            path = Path(root) / name
            if is_atomic_temporary(name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return sorted(removed)


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **kwargs):
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    A crash leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _public_mode(tmp)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for a writer that takes a filename
    (e.g. `model.save`); fsync and rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    _public_mode(tmp)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; rename it to `path` on success.

    An existing `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    _public_mode(tmp, directory=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(path, directory=False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- JSON and CSV


def json_ready(value):
    """`value` with NumPy scalars as Python numbers, tuples as lists, keys as strings and
    non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    return value


def write_json(path, data) -> Path:
    """Write `data` as indented JSON (UTF-8, a final newline), atomically.

    Values go through `json_ready`; any other object (a path) is written as its str.
    """
    text = json.dumps(json_ready(data), indent=2, allow_nan=False, default=str) + "\n"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_csv(path, rows, columns=None) -> Path:
    """Write rows as CSV (UTF-8, "\\n" line ends), atomically.

    Args:
        path: the file.
        rows: dicts (columns: `columns`, else every key in order of first use;
            a missing key is an empty cell), or sequences of cells.
        columns: the header row; None for rows of sequences writes none.
    """
    rows = list(rows)
    buffer = _io.StringIO()
    if rows and isinstance(rows[0], dict):
        if columns is None:
            columns = []
            for row in rows:
                columns += [k for k in row if k not in columns]
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        if columns is not None:
            writer.writerow(columns)
    writer.writerows(rows)
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
    return Path(path)


SKIPPED_CSV = "skipped.csv"


def write_skipped(out, problems) -> Path:
    """Write `out`/skipped.csv: the (file, reason) of every input a run left out."""
    return write_csv(
        Path(out) / SKIPPED_CSV, [(str(p), r) for p, r in problems], ["file", "reason"]
    )
