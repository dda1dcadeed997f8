"""What every layout reader shares: bad-entry handling, folder listings, name matching.

Folder and header names are matched case-insensitively, ignoring extra spaces
and underscores (`norm`); hidden files and `__MACOSX` are ignored (`visible`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path

from rmib import io
from rmib.choices import LESIONS, MASK_TYPES, ON_BAD
from rmib.data.records import Record
from rmib.errors import BadInputError, RmibError

SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}
_IGNORED_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}


# ----------------------------------------------------------------------------
# Problems, names, listings


class Problems:
    """Raises BadInputError (on_bad="error") or collects (path, reason) ("skip")."""

    def __init__(self, on_bad):
        self.on_bad = on_bad
        self.items = []

    def __call__(self, path, reason):
        if self.on_bad == "error":
            raise BadInputError(path, reason)
        self.items.append((str(path), reason))


def check_on_bad(on_bad):
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")


def check_root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise RmibError(f"{root}: folder not found; expected a dataset folder")
    if not root.is_dir():
        raise RmibError(f"{root}: not a folder; expected a dataset folder")
    return root


def norm(text) -> str:
    """Header/folder name key: case-insensitive, underscores as spaces, spaces collapsed."""
    return " ".join(str(text).replace("_", " ").split()).lower()


def visible(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in _IGNORED_NAMES


def entries(folder: Path) -> list:
    """Visible entries of `folder`, sorted by name."""
    with os.scandir(folder) as it:
        return sorted((Path(e.path) for e in it if visible(e.name)), key=lambda p: p.name)


def subdirs(folder: Path) -> list:
    return [p for p in entries(folder) if p.is_dir()]


def child_dir(folder: Path, *names) -> Path | None:
    """The subfolder of `folder` whose normalised name is one of `names`."""
    if folder is None or not folder.is_dir():
        return None
    wanted = {norm(n) for n in names}
    for path in subdirs(folder):
        if norm(path.name) in wanted:
            return path
    return None


def child_dir_matching(folder: Path, pattern: str) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    regex = re.compile(pattern)
    for path in subdirs(folder):
        if regex.search(norm(path.name)):
            return path
    return None


def image_files(folder: Path, recursive=False) -> list:
    """Image files in `folder` (and below it when `recursive`), sorted by path."""
    if folder is None or not folder.is_dir():
        return []
    if not recursive:
        return [p for p in entries(folder) if p.is_file() and io.is_image_file(p)]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if visible(d)]
        found += [Path(dirpath, f) for f in filenames if visible(f) and io.is_image_file(Path(f))]
    return sorted(found)


def describe(entries, limit=8) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def split_name(folder_name: str) -> str:
    key = norm(folder_name)
    for word, split in (("train", "train"), ("valid", "valid"), ("val", "valid"), ("test", "test")):
        if word in key:
            return split
    return key


def split_sort_key(split):
    return (SPLIT_ORDER.get(split, 9), split or "")


def mask_owner(mask: Path, code: str) -> str:
    """The image stem a mask file belongs to: "IDRiD_01_MA.tif" -> "IDRiD_01"."""
    stem = mask.stem
    suffix = "_" + code.lower()
    return stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem


def mask_code(folder_name: str) -> str | None:
    """The mask type a lesion folder holds: "1. Microaneurysms" or "MA" -> "MA"."""
    key = norm(folder_name)
    words = re.findall(r"[a-z]+", key)
    if words and words[-1].upper() in MASK_TYPES:
        return words[-1].upper()
    for code, pattern in (
        ("MA", r"micro ?aneurysm"),
        ("HE", r"ha?emorrhage"),
        ("EX", r"hard exudate"),
        ("SE", r"soft exudate|cotton"),
        ("OD", r"optic dis[ck]"),
    ):
        if re.search(pattern, key):
            return code
    return None


def ordered_lesions(codes) -> tuple:
    codes = set(codes)
    return tuple(c for c in MASK_TYPES if c in codes)


class ImageIndex:
    """Image files of a folder, found by file name or stem, case-insensitively."""

    def __init__(self, folder: Path | None, paths=None):
        self.folder = folder
        self.paths = list(paths) if paths is not None else image_files(folder)
        self._by_name, self._by_stem = {}, {}
        for path in self.paths:
            self._by_name.setdefault(path.name.lower(), path)
            self._by_stem.setdefault(path.stem.lower(), path)

    def find(self, name: str) -> Path | None:
        key = name.strip().lower()
        found = self._by_name.get(key)
        if found is None:
            stem = key
            if io.is_image_file(Path(key)):
                stem = Path(key).stem
            found = self._by_stem.get(stem)
        return found


# ----------------------------------------------------------------------------
# Split folders and lesion mask folders (IDRiD, DDR, folder-masks)


def split_folders(folder: Path | None) -> list:
    """[(split, folder)]: the split subfolders of `folder`, or (None, folder) for
    images lying directly in it."""
    if folder is None:
        return []
    groups = [(split_name(d.name), d) for d in subdirs(folder)]
    if image_files(folder):
        groups.append((None, folder))
    return sorted(groups, key=lambda g: split_sort_key(g[0]))


def masks_for_split(images: ImageIndex, mask_root: Path, codes, bad) -> dict:
    """{image path: {code: mask path}} from the lesion subfolders of `mask_root`.

    A lesion folder may be named "3. Hard Exudates" or "EX"; mask files are
    "<image stem>_<CODE>.<ext>" or "<image stem>.<ext>".
    """
    found = collections.defaultdict(dict)
    for folder in subdirs(mask_root):
        code = mask_code(folder.name)
        if code is None or code not in codes:
            bad(folder, f"unknown lesion folder; expected one for each of {', '.join(codes)}")
            continue
        for mask in image_files(folder):
            owner = mask_owner(mask, code)
            image = images.find(owner)
            if image is None:
                bad(mask, f"mask without an image: expected {owner}.* in {images.folder}")
                continue
            found[image].setdefault(code, mask)
    return found


def segmentation_records(groups, mask_folder_of, codes, bad, label_from_files=True) -> list:
    """Records of segmentation images: masks[code] = path or None (absent).

    With `label_from_files=False` (DDR, which ships a mask file for every lesion
    of every image, empty ones included) the label is unknown until decoded.
    """
    records = []
    for split, image_folder in groups:
        images = ImageIndex(image_folder)
        if not images.paths:
            continue
        mask_root = mask_folder_of(split, image_folder)
        if not mask_root.is_dir():
            bad(
                mask_root,
                f"missing: expected the lesion masks of the {len(images.paths)} images in "
                f"{image_folder}",
            )
            continue
        found = masks_for_split(images, mask_root, codes, bad)
        for path in images.paths:
            masks = {code: found[path].get(code) for code in codes}
            label = int(any(masks.get(c) is not None for c in LESIONS))
            if not label_from_files:
                label = None
            records.append(
                Record(image=path, name=path.stem, label=label, masks=masks, split=split)
            )
    return records


# ----------------------------------------------------------------------------
# Layout families


@dataclasses.dataclass(frozen=True)
class Family:
    """A layout family: its name, how to find its parts in a folder, how to read them."""

    name: str
    find_parts: object  # (root) -> [part names present]
    read: object  # (root, parts, bad) -> (records, lesions)
