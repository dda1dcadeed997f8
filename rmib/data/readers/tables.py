"""Label tables: .csv, .xlsx and .xls grade tables (Messidor, Kaggle, APTOS, IDRiD) and
DDR's .txt lists, matched to the images of a folder."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

from rmib.data.readers.common import ImageIndex, norm
from rmib.data.records import Record
from rmib.errors import BadInputError


@dataclasses.dataclass
class LabelRow:
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


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _csv_rows(path: Path):
    text = read_text(path)
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


def label_rows(path: Path, name_column: str, grade_column: str, bad) -> list | None:
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
    keys = [norm(h) for h in header]
    missing = [c for c in (name_column, grade_column) if norm(c) not in keys]
    if missing:
        found = ", ".join(f"'{h}'" for h in header if h) or "none"
        bad(
            path,
            f"missing column(s) {', '.join(repr(m) for m in missing)} in the header row "
            f"{header_number}; {expected} (found {found})",
        )
        return None
    name_at, grade_at = keys.index(norm(name_column)), keys.index(norm(grade_column))

    def cell(cells, at):
        return cells[at] if at < len(cells) else ""

    return [LabelRow(path, n, cell(cells, name_at), cell(cells, grade_at)) for n, cells in rows[1:]]


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


def match_labels(rows, index: ImageIndex, max_grade, split, bad, leave_out=()) -> list:
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
