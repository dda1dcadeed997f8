"""DDR: lesion_segmentation/<split>/image/<name>.jpg + label/{EX,HE,MA,SE}/<name>.tif, and
DR_grading/<split>/<name>.jpg + DR_grading/<split>.txt ("<file> <grade>" per line;
grade 5 = ungradable, left out)."""

from __future__ import annotations

from pathlib import Path

from rmib.choices import LESIONS
from rmib.data.readers.common import (
    ImageIndex,
    child_dir,
    entries,
    segmentation_records,
    split_name,
    split_sort_key,
    subdirs,
)
from rmib.data.readers.tables import LabelRow, match_labels, read_text


def find_parts(root):
    parts = []
    if child_dir(root, "lesion_segmentation"):
        parts.append("ddr-segmentation")
    if child_dir(root, "DR_grading"):
        parts.append("ddr-grading")
    return parts


def read(root, parts, bad):
    records, lesions = [], ()
    if "ddr-segmentation" in parts:
        part = child_dir(root, "lesion_segmentation")
        groups, label_dirs = [], {}
        for folder in subdirs(part):
            split = split_name(folder.name)
            groups.append((split, child_dir(folder, "image", "images") or folder / "image"))
            label_dirs[split] = child_dir(folder, "label", "labels") or folder / "label"
        groups.sort(key=lambda g: split_sort_key(g[0]))
        records += segmentation_records(
            groups, lambda s, _: label_dirs[s], LESIONS, bad, label_from_files=False
        )
        lesions = LESIONS
    if "ddr-grading" in parts:
        records += _read_ddr_grading(child_dir(root, "DR_grading"), bad)
    return records, lesions


def _ddr_rows(path: Path, bad) -> list:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            bad(path, f"line {number}: expected '<image file> <grade>', got {line.strip()!r}")
            continue
        rows.append(LabelRow(path, number, fields[0], fields[1], unit="line"))
    return rows


def _read_ddr_grading(part: Path, bad) -> list:
    folders = {split_name(d.name): d for d in subdirs(part)}
    lists = {
        split_name(p.stem): p for p in entries(part) if p.is_file() and p.suffix.lower() == ".txt"
    }
    records = []
    for split in sorted(set(folders) | set(lists), key=split_sort_key):
        folder = folders.get(split)
        index = ImageIndex(folder) if folder is not None else ImageIndex(part / split, [])
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
        records += match_labels(rows, index, max_grade=4, split=split, bad=bad, leave_out=(5,))
    return records
