"""Dataset readers: one per layout on disk, each returning a `Dataset` of `Record`s.

Readers only list files and read label tables; they never decode an image, so
reading the 35,126 photographs of Kaggle/EyePACS takes seconds.
`check_dataset` and `summarize_dataset` decode (or header-read) every file.

Layouts (folder and header names are matched case-insensitively, ignoring
extra spaces and underscores; hidden files and `__MACOSX` are ignored):

    messidor            any folder (recursively) with Annotation_Base*.xls|.xlsx|.csv
                        ("Image name", "Retinopathy grade" 0-3) beside its .tif images
    kaggle              trainLabels.csv (image, level 0-4) + train/<image>.jpeg
    aptos               train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png
    idrid-segmentation  A. Segmentation/1. Original Images/<split>/IDRiD_NN.jpg +
                        A. Segmentation/2. All Segmentation Groundtruths/<split>/
                        <n. Lesion name>/IDRiD_NN_<CODE>.tif (no file = lesion absent)
    idrid-grading       B. Disease Grading/1. Original Images/<split>/IDRiD_NNN.jpg +
                        B. Disease Grading/2. Groundtruths/<...Training|Testing Labels>.csv
    e-ophtha            e_optha_EX/{EX,healthy}/<patient>/<img>.jpg +
                        e_optha_EX/Annotation_EX/<patient>/<img>_EX.png; same with MA
    ddr-segmentation    lesion_segmentation/<split>/image/<name>.jpg +
                        lesion_segmentation/<split>/label/{EX,HE,MA,SE}/<name>.tif
    ddr-grading         DR_grading/<split>/<name>.jpg + DR_grading/<split>.txt
                        ("<file> <grade>" per line; grade 5 = ungradable, left out)
    folder-classes      healthy/* + lesion/*
    folder-masks        images/* + masks/<LESION>/<image stem>.<any image ext>

"idrid", "ddr" and "folder" name the family: a tree holding both parts of it
reads as one Dataset with that layout name.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import os
import re
from pathlib import Path

from rmib import LESIONS, io
from rmib.data.records import Dataset, Record
from rmib.errors import BadInputError, RmibError

MASK_TYPES = LESIONS + ("OD",)
"""Every mask type a reader may attach: the four lesions and the optic disc."""

ON_BAD_CHOICES = ("error", "skip")
_SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}
_IGNORED_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
# Messidor can sit a few folders down (Messidor/Base11/...); a bounded walk
# keeps detection fast when the user points at a big unrelated folder.
_MESSIDOR_MAX_DEPTH = 4
_MESSIDOR_ANNOTATION = re.compile(r"^annotation[ _-]?base.*\.(xls|xlsx|csv)$", re.IGNORECASE)


# ----------------------------------------------------------------------------
# Public API


def read_dataset(root, layout=None, on_bad="error", allow_empty=False) -> Dataset:
    """Read the records of a dataset tree.

    Args:
        root: the dataset folder.
        layout: one of `LAYOUTS` ("idrid", "kaggle", ... or a part such as
            "idrid-grading"); detected with `detect_layout` when None.
        on_bad: "error" raises at the first bad entry; "skip" leaves it out and
            appends (path, reason) to `Dataset.problems`.
        allow_empty: return a dataset without records instead of raising.

    Returns:
        The Dataset; its `layout` is the part read ("idrid-segmentation"), or
        the family name when the tree holds several parts of it ("idrid").

    Raises:
        BadInputError: with on_bad="error", naming the first bad file and what
            was expected (a label naming a missing image, an image without a
            label, a bad grade, a table without the expected columns, ...).
        RmibError: not a folder, unknown or undetectable layout, no images.
    """
    _check_on_bad(on_bad)
    root = _check_root(root)
    layout = detect_layout(root) if layout is None else str(layout).strip().lower()
    family, parts = _resolve_layout(root, layout)
    bad = _Problems(on_bad)
    records, lesions = family.read(root, parts, bad)
    name = parts[0] if len(parts) == 1 else family.name
    dataset = Dataset(
        layout=name, root=root, records=records, lesions=tuple(lesions), problems=bad.items
    )
    if not records and not allow_empty:
        detail = ""
        if bad.items:
            path, reason = bad.items[0]
            detail = f"; {len(bad.items)} entries skipped, the first: {path}: {reason}"
        raise RmibError(f"{root}: no usable images found for the {name} layout{detail}")
    return dataset


def detect_layout(root) -> str:
    """The layout name of the dataset tree at `root` (see `LAYOUTS`).

    Raises:
        RmibError: naming the folder, what it holds and the known layouts, when
            no layout matches or several do.
    """
    root = _check_root(root)
    entries = _entries(root)
    if not entries:
        raise RmibError(f"{root}: the folder is empty; expected a dataset. {_known_layouts()}")
    matches = _matching_families(root)
    if len(matches) > 1:
        names = ", ".join(_layout_name(f, p) for f, p in matches)
        raise RmibError(
            f"{root}: the folder matches several layouts ({names}); choose one with --layout"
        )
    if matches:
        return _layout_name(*matches[0])
    hint = ""
    for child in [p for p in entries if p.is_dir()][:50]:
        if _matching_families(child, deep=False):
            hint = f" Did you mean {child}?"
            break
    raise RmibError(
        f"{root}: no known dataset layout found (the folder holds {_describe(entries)}). "
        f"{_known_layouts()}{hint}"
    )


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
    _check_on_bad(on_bad)
    bad = _Problems(on_bad)
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
    bad = _Problems("skip")
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
        key=lambda s: (_SPLIT_ORDER.get(s, 9), s),
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
            if _has_lesion_pixels(path):
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


def _has_lesion_pixels(mask_path, expected_shape=None) -> bool:
    """True when the mask file holds at least one lesion pixel (any non-zero value)."""
    return bool(io.read_mask(mask_path, expected_shape=expected_shape).any())


# ----------------------------------------------------------------------------
# Problems, names, listings


class _Problems:
    """Raises BadInputError (on_bad="error") or collects (path, reason) ("skip")."""

    def __init__(self, on_bad):
        self.on_bad = on_bad
        self.items = []

    def __call__(self, path, reason):
        if self.on_bad == "error":
            raise BadInputError(path, reason)
        self.items.append((str(path), reason))


def _check_on_bad(on_bad):
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")


def _check_root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise RmibError(f"{root}: folder not found; expected a dataset folder")
    if not root.is_dir():
        raise RmibError(f"{root}: not a folder; expected a dataset folder")
    return root


def _norm(text) -> str:
    """Header/folder name key: case-insensitive, underscores as spaces, spaces collapsed."""
    return " ".join(str(text).replace("_", " ").split()).lower()


def _visible(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in _IGNORED_NAMES


def _entries(folder: Path) -> list:
    """Visible entries of `folder`, sorted by name."""
    with os.scandir(folder) as it:
        return sorted((Path(e.path) for e in it if _visible(e.name)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list:
    return [p for p in _entries(folder) if p.is_dir()]


def _child_dir(folder: Path, *names) -> Path | None:
    """The subfolder of `folder` whose normalised name is one of `names`."""
    if folder is None or not folder.is_dir():
        return None
    wanted = {_norm(n) for n in names}
    for path in _subdirs(folder):
        if _norm(path.name) in wanted:
            return path
    return None


def _child_dir_matching(folder: Path, pattern: str) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    regex = re.compile(pattern)
    for path in _subdirs(folder):
        if regex.search(_norm(path.name)):
            return path
    return None


def _image_files(folder: Path, recursive=False) -> list:
    """Image files in `folder` (and below it when `recursive`), sorted by path."""
    if folder is None or not folder.is_dir():
        return []
    if not recursive:
        return [p for p in _entries(folder) if p.is_file() and io.is_image_file(p)]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        found += [Path(dirpath, f) for f in filenames if _visible(f) and io.is_image_file(Path(f))]
    return sorted(found)


def _describe(entries, limit=8) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _split_name(folder_name: str) -> str:
    key = _norm(folder_name)
    for word, split in (("train", "train"), ("valid", "valid"), ("val", "valid"), ("test", "test")):
        if word in key:
            return split
    return key


def _split_sort_key(split):
    return (_SPLIT_ORDER.get(split, 9), split or "")


def _mask_owner(mask: Path, code: str) -> str:
    """The image stem a mask file belongs to: "IDRiD_01_MA.tif" -> "IDRiD_01"."""
    stem = mask.stem
    suffix = "_" + code.lower()
    return stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem


def _mask_code(folder_name: str) -> str | None:
    """The mask type a lesion folder holds: "1. Microaneurysms" or "MA" -> "MA"."""
    key = _norm(folder_name)
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


def _ordered_lesions(codes) -> tuple:
    codes = set(codes)
    return tuple(c for c in MASK_TYPES if c in codes)


class _ImageIndex:
    """Image files of a folder, found by file name or stem, case-insensitively."""

    def __init__(self, folder: Path | None, paths=None):
        self.folder = folder
        self.paths = list(paths) if paths is not None else _image_files(folder)
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
# Label tables (.csv, .xlsx, .xls, DDR .txt)


@dataclasses.dataclass
class _LabelRow:
    file: Path
    number: int  # 1-based row (line) number in the file
    name: str
    grade: object
    unit: str = "row"  # how messages call `number`: "row" of a table, "line" of a text file


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _csv_rows(path: Path):
    text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = max(",;\t", key=first.count) if first else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    return [(reader.line_num, [_cell(v) for v in row]) for row in reader]


def _xlsx_rows(path: Path, expected: str):
    import openpyxl

    # A file object, not the path: openpyxl refuses names not ending in .xlsx.
    with open(path, "rb") as f:
        try:
            book = openpyxl.load_workbook(f, read_only=True, data_only=True)
            sheet = book.worksheets[0]
            rows = [
                (number, [_cell(v) for v in row])
                for number, row in enumerate(sheet.iter_rows(values_only=True), start=1)
            ]
            book.close()
        except Exception as exc:  # zipfile, XML and openpyxl errors alike
            raise BadInputError(
                path, f"not a readable .xlsx spreadsheet ({type(exc).__name__}: {exc}); {expected}"
            ) from None
    return rows


def _xls_rows(path: Path, expected: str):
    import xlrd

    try:
        book = xlrd.open_workbook(path, on_demand=True)
        sheet = book.sheet_by_index(0)
        return [(n + 1, [_cell(v) for v in sheet.row_values(n)]) for n in range(sheet.nrows)]
    except Exception as exc:  # xlrd.XLRDError, struct and compdoc errors alike
        raise BadInputError(
            path, f"not a readable .xls spreadsheet ({type(exc).__name__}: {exc}); {expected}"
        ) from None


def _table_rows(path: Path, expected: str):
    """[(row number, [cell text])] of a .csv, .xlsx or .xls file (first sheet)."""
    suffix = path.suffix.lower()
    if suffix in (".xls", ".xlsx", ".xlsm"):
        with open(path, "rb") as f:
            magic = f.read(8)
        # Files are sniffed, not trusted by name: Messidor copies exist whose
        # .xls is an .xlsx workbook.
        if magic.startswith(b"PK"):
            return _xlsx_rows(path, expected)
        if magic == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
            return _xls_rows(path, expected)
        kind = "empty" if not magic else "not an Excel workbook (neither .xls nor .xlsx content)"
        raise BadInputError(path, f"{kind}; {expected}")
    return _csv_rows(path)


def _label_rows(path: Path, name_column: str, grade_column: str, bad) -> list | None:
    """The (name, grade) rows of a label table, or None after reporting it bad."""
    expected = f"expected a table with columns '{name_column}' and '{grade_column}'"
    try:
        rows = _table_rows(path, expected)
    except BadInputError as exc:
        bad(exc.path, exc.reason)
        return None
    except OSError as exc:
        bad(path, f"cannot read the file ({exc.strerror or exc}); {expected}")
        return None
    rows = [(n, cells) for n, cells in rows if any(cells)]
    if not rows:
        bad(path, f"the table is empty; {expected}")
        return None
    header_number, header = rows[0]
    keys = [_norm(h) for h in header]
    missing = [c for c in (name_column, grade_column) if _norm(c) not in keys]
    if missing:
        found = ", ".join(f"'{h}'" for h in header if h) or "none"
        bad(
            path,
            f"missing column(s) {', '.join(repr(m) for m in missing)} in the header row "
            f"{header_number}; {expected} (found {found})",
        )
        return None
    name_at, grade_at = keys.index(_norm(name_column)), keys.index(_norm(grade_column))

    def cell(cells, at):
        return cells[at] if at < len(cells) else ""

    return [
        _LabelRow(path, n, cell(cells, name_at), cell(cells, grade_at)) for n, cells in rows[1:]
    ]


def _parse_grade(text, name, max_grade, leave_out=()) -> int:
    allowed = f"expected a whole number 0-{max_grade}"
    text = _cell(text)
    if not text:
        raise ValueError(f"no grade for '{name}'; {allowed}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"grade {text!r} for '{name}' is not a number; {allowed}") from None
    if not math.isfinite(value) or not value.is_integer():
        raise ValueError(f"grade {text!r} for '{name}' is not a whole number; {allowed}")
    grade = int(value)
    if not (0 <= grade <= max_grade or grade in leave_out):
        raise ValueError(f"grade {grade} for '{name}' is out of range; {allowed}")
    return grade


def _match_labels(rows, index: _ImageIndex, max_grade, split, bad, leave_out=()) -> list:
    """Records for label rows matched to the images of `index`.

    Reports rows naming missing images, bad grades, conflicting duplicates and
    images that no row labels. Rows graded in `leave_out` label their image
    but produce no record.
    """
    records, labelled, label_files = {}, {}, []
    for row in rows:
        if row.file not in label_files:
            label_files.append(row.file)
        where = f"{row.unit} {row.number}"
        if not row.name:
            bad(row.file, f"{where}: no image name")
            continue
        path = index.find(row.name)
        if path is None:
            bad(row.file, f"{where}: image '{row.name}' not found in {index.folder}")
            continue
        try:
            grade = _parse_grade(row.grade, row.name, max_grade, leave_out)
        except ValueError as exc:
            labelled.setdefault(path, (None, row))
            bad(row.file, f"{where}: {exc}")
            continue
        if path in labelled:
            first_grade, first = labelled[path]
            if first_grade is not None and first_grade != grade:
                records.pop(path, None)
                bad(
                    row.file,
                    f"{where}: '{row.name}' has grade {grade} here but {first_grade} in "
                    f"{first.unit} {first.number} of {first.file.name}; expected one grade per image",
                )
            continue
        labelled[path] = (grade, row)
        if grade not in leave_out:
            records[path] = Record(
                image=path, name=path.stem, grade=grade, label=int(grade > 0), split=split
            )
    files = " or ".join(str(f) for f in label_files) or "the label file"
    for path in index.paths:
        if path not in labelled:
            bad(path, f"image without a label: '{path.name}' has no row in {files}")
    return list(records.values())


# ----------------------------------------------------------------------------
# Layout families


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    find_parts: object  # (root) -> [part names present]
    read: object  # (root, parts, bad) -> (records, lesions)


def _layout_name(family: _Family, parts: list) -> str:
    return parts[0] if len(parts) == 1 else family.name


def _matching_families(root: Path, deep=True) -> list:
    """[(family, parts)] for every layout `root` holds. Messidor, the only layout
    found by walking the tree, is looked for when no other matches."""
    found = [(f, f.find_parts(root)) for f in _FAMILIES.values() if f.name != "messidor"]
    found = [(f, parts) for f, parts in found if parts]
    if not found:
        parts = _messidor_parts(root, max_depth=_MESSIDOR_MAX_DEPTH if deep else 0)
        if parts:
            found = [(_FAMILIES["messidor"], parts)]
    return found


def _resolve_layout(root: Path, layout: str):
    for family in _FAMILIES.values():
        if layout == family.name:
            wanted = family.find_parts(root)
        elif layout in _PARTS.get(family.name, ()):
            wanted = [layout] if layout in family.find_parts(root) else []
        else:
            continue
        if not wanted:
            raise RmibError(
                f"{root}: not in the {layout} layout; expected {_PART_DESCRIPTIONS[layout]} "
                f"(the folder holds {_describe(_entries(root)) or 'nothing'})"
            )
        return family, wanted
    raise RmibError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _known_layouts() -> str:
    return "Known layouts: " + "; ".join(
        f"{name} ({_PART_DESCRIPTIONS[name]})" for name in _ALL_PARTS
    )


# --- messidor ----------------------------------------------------------------


def _messidor_annotations(root: Path, max_depth=_MESSIDOR_MAX_DEPTH) -> list:
    found = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        dirnames[:] = sorted(d for d in dirnames if _visible(d)) if depth < max_depth else []
        found += [Path(dirpath, f) for f in filenames if _MESSIDOR_ANNOTATION.match(f)]
    return sorted(found)


def _messidor_parts(root, max_depth=_MESSIDOR_MAX_DEPTH):
    return ["messidor"] if _messidor_annotations(root, max_depth) else []


def _read_messidor(root, parts, bad):
    by_folder = collections.defaultdict(list)
    for path in _messidor_annotations(root):
        by_folder[path.parent].append(path)
    records = []
    for folder, files in sorted(by_folder.items()):
        tables = [_label_rows(path, "Image name", "Retinopathy grade", bad) for path in files]
        if all(rows is None for rows in tables):
            continue  # reported; listing every image as unlabelled would bury that
        rows = [row for rows in tables if rows for row in rows]
        index = _ImageIndex(folder)
        records += _match_labels(rows, index, max_grade=3, split=None, bad=bad)
    return records, ()


# --- kaggle / aptos ----------------------------------------------------------


def _csv_layout_parts(csv_name, images_dir, layout):
    def find_parts(root):
        has_csv = any(p.is_file() and p.name.lower() == csv_name.lower() for p in _entries(root))
        return [layout] if has_csv and _child_dir(root, images_dir) else []

    return find_parts


def _csv_layout_reader(csv_name, images_dir, name_column, grade_column):
    def read(root, parts, bad):
        table = next(p for p in _entries(root) if p.name.lower() == csv_name.lower())
        rows = _label_rows(table, name_column, grade_column, bad)
        if rows is None:
            return [], ()
        index = _ImageIndex(_child_dir(root, images_dir))
        return _match_labels(rows, index, max_grade=4, split=None, bad=bad), ()

    return read


# --- idrid -------------------------------------------------------------------

_IDRID_A = r"^(a\.? ?)?segmentation$"
_IDRID_B = r"^(b\.? ?)?disease grading$"


def _idrid_parts(root):
    parts = []
    if _child_dir_matching(root, _IDRID_A):
        parts.append("idrid-segmentation")
    if _child_dir_matching(root, _IDRID_B):
        parts.append("idrid-grading")
    return parts


def _split_folders(folder: Path | None) -> list:
    """[(split, folder)]: the split subfolders of `folder`, or (None, folder) for
    images lying directly in it."""
    if folder is None:
        return []
    groups = [(_split_name(d.name), d) for d in _subdirs(folder)]
    if _image_files(folder):
        groups.append((None, folder))
    return sorted(groups, key=lambda g: _split_sort_key(g[0]))


def _masks_for_split(images: _ImageIndex, mask_root: Path, codes, bad) -> dict:
    """{image path: {code: mask path}} from the lesion subfolders of `mask_root`.

    A lesion folder may be named "3. Hard Exudates" or "EX"; mask files are
    "<image stem>_<CODE>.<ext>" or "<image stem>.<ext>".
    """
    found = collections.defaultdict(dict)
    for folder in _subdirs(mask_root):
        code = _mask_code(folder.name)
        if code is None or code not in codes:
            bad(folder, f"unknown lesion folder; expected one for each of {', '.join(codes)}")
            continue
        for mask in _image_files(folder):
            owner = _mask_owner(mask, code)
            image = images.find(owner)
            if image is None:
                bad(mask, f"mask without an image: expected {owner}.* in {images.folder}")
                continue
            found[image].setdefault(code, mask)
    return found


def _segmentation_records(groups, mask_folder_of, codes, bad, label_from_files=True) -> list:
    """Records of segmentation images: masks[code] = path or None (absent).

    With `label_from_files=False` (DDR, which ships a mask file for every lesion
    of every image, empty ones included) the label is unknown until decoded.
    """
    records = []
    for split, image_folder in groups:
        images = _ImageIndex(image_folder)
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
        found = _masks_for_split(images, mask_root, codes, bad)
        for path in images.paths:
            masks = {code: found[path].get(code) for code in codes}
            label = int(any(masks.get(c) is not None for c in LESIONS))
            if not label_from_files:
                label = None
            records.append(
                Record(image=path, name=path.stem, label=label, masks=masks, split=split)
            )
    return records


def _read_idrid(root, parts, bad):
    records, lesions = [], ()
    if "idrid-segmentation" in parts:
        part = _child_dir_matching(root, _IDRID_A)
        originals = _child_dir_matching(part, r"original images|^(\d+\.? ?)?images$")
        truths = _child_dir_matching(part, r"ground ?truth")
        if originals is None:
            bad(part, "no '1. Original Images' folder; expected the photographs in it")
        groups = _split_folders(originals)

        def mask_folder_of(split, image_folder):
            base = truths or part / "2. All Segmentation Groundtruths"
            if split is None:
                return base
            for folder in _subdirs(base) if base.is_dir() else []:
                if _split_name(folder.name) == split:
                    return folder
            return base / image_folder.name

        records += _segmentation_records(groups, mask_folder_of, MASK_TYPES, bad)
        lesions = MASK_TYPES
    if "idrid-grading" in parts:
        records += _read_idrid_grading(_child_dir_matching(root, _IDRID_B), bad)
    return records, lesions


def _read_idrid_grading(part: Path, bad) -> list:
    originals = _child_dir_matching(part, r"original images|^(\d+\.? ?)?images$")
    truths = _child_dir_matching(part, r"ground ?truth|labels?$")
    tables = {}
    if truths is not None:
        for path in _entries(truths):
            if path.is_file() and path.suffix.lower() in (".csv", ".xlsx", ".xls"):
                tables.setdefault(_split_name(path.stem), path)
    groups = dict(_split_folders(originals))
    records = []
    for split in sorted(set(groups) | set(tables), key=_split_sort_key):
        folder = groups.get(split)
        if folder is None:
            expected = {"train": "a. Training Set", "test": "b. Testing Set"}.get(split, split)
            index = _ImageIndex((originals or part / "1. Original Images") / expected, [])
        else:
            index = _ImageIndex(folder)
        table = tables.get(split)
        if table is None:
            if index.paths:
                where = truths if truths is not None else part
                bad(
                    where,
                    f"no labels for the {len(index.paths)} images in {folder}: expected a "
                    f"CSV named like '{'a' if split == 'train' else 'b'}. IDRiD_Disease Grading_"
                    f"{'Training' if split == 'train' else 'Testing'} Labels.csv' with columns "
                    "'Image name' and 'Retinopathy grade'",
                )
            continue
        rows = _label_rows(table, "Image name", "Retinopathy grade", bad)
        if rows is not None:
            records += _match_labels(rows, index, max_grade=4, split=split, bad=bad)
    return records


# --- e-ophtha ----------------------------------------------------------------

_EOPHTHA_SET = re.compile(r"^e[\W_]*(optha|ophtha)[\W_]*(ex|ma)$", re.IGNORECASE)


def _eophtha_sets(root) -> list:
    sets = []
    for folder in _subdirs(root):
        match = _EOPHTHA_SET.match(folder.name)
        if match:
            sets.append((match.group(2).upper(), folder))
    return sets


def _eophtha_parts(root):
    return ["e-ophtha"] if _eophtha_sets(root) else []


def _read_eophtha(root, parts, bad):
    records, codes = [], []
    for code, folder in _eophtha_sets(root):
        codes.append(code)
        lesion_dir = _child_dir(folder, code)
        annotation_dir = _child_dir(folder, f"Annotation_{code}", f"Annotations_{code}")
        healthy_dir = _child_dir(folder, "healthy")
        annotations = {}
        for mask in _image_files(annotation_dir, recursive=True):
            key = (mask.parent.relative_to(annotation_dir), _mask_owner(mask, code).lower())
            annotations.setdefault(key, mask)
        used = set()
        for image in _image_files(lesion_dir, recursive=True):
            key = (image.parent.relative_to(lesion_dir), image.stem.lower())
            mask = annotations.get(key)
            if mask is None:
                expected = (annotation_dir or folder / f"Annotation_{code}") / key[0]
                bad(image, f"no {code} annotation: expected {expected}/{image.stem}_{code}.png")
                continue
            used.add(key)
            records.append(Record(image=image, name=image.stem, label=1, masks={code: mask}))
        for key, mask in sorted(annotations.items(), key=lambda kv: str(kv[1])):
            if key not in used:
                expected = (lesion_dir or folder / code) / key[0]
                bad(mask, f"annotation without an image: expected {expected}/{key[1]}.jpg")
        for image in _image_files(healthy_dir, recursive=True):
            records.append(Record(image=image, name=image.stem, label=0, masks={code: None}))
    return records, _ordered_lesions(codes)


# --- ddr ---------------------------------------------------------------------


def _ddr_parts(root):
    parts = []
    if _child_dir(root, "lesion_segmentation"):
        parts.append("ddr-segmentation")
    if _child_dir(root, "DR_grading"):
        parts.append("ddr-grading")
    return parts


def _read_ddr(root, parts, bad):
    records, lesions = [], ()
    if "ddr-segmentation" in parts:
        part = _child_dir(root, "lesion_segmentation")
        groups, label_dirs = [], {}
        for folder in _subdirs(part):
            split = _split_name(folder.name)
            groups.append((split, _child_dir(folder, "image", "images") or folder / "image"))
            label_dirs[split] = _child_dir(folder, "label", "labels") or folder / "label"
        groups.sort(key=lambda g: _split_sort_key(g[0]))
        records += _segmentation_records(
            groups, lambda s, _: label_dirs[s], LESIONS, bad, label_from_files=False
        )
        lesions = LESIONS
    if "ddr-grading" in parts:
        records += _read_ddr_grading(_child_dir(root, "DR_grading"), bad)
    return records, lesions


def _ddr_rows(path: Path, bad) -> list:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            bad(path, f"line {number}: expected '<image file> <grade>', got {line.strip()!r}")
            continue
        rows.append(_LabelRow(path, number, fields[0], fields[1], unit="line"))
    return rows


def _read_ddr_grading(part: Path, bad) -> list:
    folders = {_split_name(d.name): d for d in _subdirs(part)}
    lists = {
        _split_name(p.stem): p for p in _entries(part) if p.is_file() and p.suffix.lower() == ".txt"
    }
    records = []
    for split in sorted(set(folders) | set(lists), key=_split_sort_key):
        folder = folders.get(split)
        index = _ImageIndex(folder) if folder is not None else _ImageIndex(part / split, [])
        if split not in lists:
            if index.paths:
                bad(
                    part / f"{split}.txt",
                    f"missing: expected the grades of the {len(index.paths)} images in "
                    f"{folder}, one '<image file> <grade>' per line",
                )
            continue
        rows = _ddr_rows(lists[split], bad)
        # Grade 5 marks an ungradable photograph: labelled, but left out.
        records += _match_labels(rows, index, max_grade=4, split=split, bad=bad, leave_out=(5,))
    return records


# --- folder ------------------------------------------------------------------


def _folder_parts(root):
    parts = []
    if _child_dir(root, "healthy") and _child_dir(root, "lesion"):
        parts.append("folder-classes")
    if _child_dir(root, "images") and _child_dir(root, "masks"):
        parts.append("folder-masks")
    return parts


def _read_folder(root, parts, bad):
    records, lesions = [], ()
    if "folder-classes" in parts:
        for label, name in ((0, "healthy"), (1, "lesion")):
            for image in _image_files(_child_dir(root, name), recursive=True):
                records.append(Record(image=image, name=image.stem, label=label))
    if "folder-masks" in parts:
        mask_root = _child_dir(root, "masks")
        lesions = _ordered_lesions(_mask_code(d.name) for d in _subdirs(mask_root))
        images = _ImageIndex(_child_dir(root, "images"))
        found = _masks_for_split(images, mask_root, lesions, bad)
        for path in images.paths:
            masks = {code: found[path].get(code) for code in lesions}
            label = int(any(masks.get(c) is not None for c in LESIONS))
            records.append(Record(image=path, name=path.stem, label=label, masks=masks))
    return records, lesions


# --- registry ----------------------------------------------------------------

_FAMILIES = {
    f.name: f
    for f in (
        _Family(
            "messidor",
            _messidor_parts,
            _read_messidor,
        ),
        _Family(
            "kaggle",
            _csv_layout_parts("trainLabels.csv", "train", "kaggle"),
            _csv_layout_reader("trainLabels.csv", "train", "image", "level"),
        ),
        _Family(
            "aptos",
            _csv_layout_parts("train.csv", "train_images", "aptos"),
            _csv_layout_reader("train.csv", "train_images", "id_code", "diagnosis"),
        ),
        _Family("idrid", _idrid_parts, _read_idrid),
        _Family("e-ophtha", _eophtha_parts, _read_eophtha),
        _Family("ddr", _ddr_parts, _read_ddr),
        _Family(
            "folder",
            _folder_parts,
            _read_folder,
        ),
    )
}

_PARTS = {
    "idrid": ("idrid-segmentation", "idrid-grading"),
    "ddr": ("ddr-segmentation", "ddr-grading"),
    "folder": ("folder-classes", "folder-masks"),
}

_PART_DESCRIPTIONS = {
    "messidor": "Annotation_Base*.xls|.xlsx|.csv beside its .tif images",
    "kaggle": "trainLabels.csv + train/",
    "aptos": "train.csv + train_images/",
    "idrid": "A. Segmentation/ and/or B. Disease Grading/",
    "idrid-segmentation": "A. Segmentation/1. Original Images/ + 2. All Segmentation Groundtruths/",
    "idrid-grading": "B. Disease Grading/1. Original Images/ + 2. Groundtruths/*.csv",
    "e-ophtha": "e_optha_EX/ and/or e_optha_MA/",
    "ddr": "lesion_segmentation/ and/or DR_grading/",
    "ddr-segmentation": "lesion_segmentation/<split>/image/ + label/<LESION>/",
    "ddr-grading": "DR_grading/<split>/ + DR_grading/<split>.txt",
    "folder": "healthy/ + lesion/, or images/ + masks/<LESION>/",
    "folder-classes": "healthy/ + lesion/",
    "folder-masks": "images/ + masks/<LESION>/",
}

_ALL_PARTS = (
    "messidor",
    "kaggle",
    "aptos",
    "idrid-segmentation",
    "idrid-grading",
    "e-ophtha",
    "ddr-segmentation",
    "ddr-grading",
    "folder-classes",
    "folder-masks",
)

LAYOUTS = (
    "messidor",
    "kaggle",
    "aptos",
    "idrid",
    "idrid-segmentation",
    "idrid-grading",
    "e-ophtha",
    "ddr",
    "ddr-segmentation",
    "ddr-grading",
    "folder",
    "folder-classes",
    "folder-masks",
)
"""Every name `read_dataset(layout=...)` accepts: families and their parts."""


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
                if _has_lesion_pixels(mask, expected_shape=shape):
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
