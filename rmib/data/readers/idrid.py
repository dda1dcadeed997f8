"""IDRiD: A. Segmentation (lesion masks, no file = lesion absent) and B. Disease Grading.

A. Segmentation/1. Original Images/<split>/IDRiD_NN.jpg +
A. Segmentation/2. All Segmentation Groundtruths/<split>/<n. Lesion name>/IDRiD_NN_<CODE>.tif
B. Disease Grading/1. Original Images/<split>/IDRiD_NNN.jpg +
B. Disease Grading/2. Groundtruths/<...Training|Testing Labels>.csv
"""

from __future__ import annotations

from pathlib import Path

from rmib.choices import MASK_TYPES
from rmib.data.readers.common import (
    ImageIndex,
    child_dir_matching,
    entries,
    segmentation_records,
    split_folders,
    split_name,
    split_sort_key,
    subdirs,
)
from rmib.data.readers.tables import label_rows, match_labels

IDRID_SEGMENTATION_PART = r"^(a\.? ?)?segmentation$"
IDRID_GRADING_PART = r"^(b\.? ?)?disease grading$"


def find_parts(root):
    parts = []
    if child_dir_matching(root, IDRID_SEGMENTATION_PART):
        parts.append("idrid-segmentation")
    if child_dir_matching(root, IDRID_GRADING_PART):
        parts.append("idrid-grading")
    return parts


def read(root, parts, bad):
    records, lesions = [], ()
    if "idrid-segmentation" in parts:
        part = child_dir_matching(root, IDRID_SEGMENTATION_PART)
        originals = child_dir_matching(part, r"original images|^(\d+\.? ?)?images$")
        truths = child_dir_matching(part, r"ground ?truth")
        if originals is None:
            bad(part, "no '1. Original Images' folder; expected the photographs in it")
        groups = split_folders(originals)

        def mask_folder_of(split, image_folder):
            base = truths or part / "2. All Segmentation Groundtruths"
            if split is None:
                return base
            for folder in subdirs(base) if base.is_dir() else []:
                if split_name(folder.name) == split:
                    return folder
            return base / image_folder.name

        records += segmentation_records(groups, mask_folder_of, MASK_TYPES, bad)
        lesions = MASK_TYPES
    if "idrid-grading" in parts:
        records += _read_idrid_grading(child_dir_matching(root, IDRID_GRADING_PART), bad)
    return records, lesions


def _read_idrid_grading(part: Path, bad) -> list:
    originals = child_dir_matching(part, r"original images|^(\d+\.? ?)?images$")
    truths = child_dir_matching(part, r"ground ?truth|labels?$")
    tables = {}
    if truths is not None:
        for path in entries(truths):
            if path.is_file() and path.suffix.lower() in (".csv", ".xlsx", ".xls"):
                tables.setdefault(split_name(path.stem), path)
    groups = dict(split_folders(originals))
    records = []
    for split in sorted(set(groups) | set(tables), key=split_sort_key):
        folder = groups.get(split)
        if folder is None:
            expected = {"train": "a. Training Set", "test": "b. Testing Set"}.get(split, split)
            index = ImageIndex((originals or part / "1. Original Images") / expected, [])
        else:
            index = ImageIndex(folder)
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
        rows = label_rows(table, "Image name", "Retinopathy grade", bad)
        if rows is not None:
            records += match_labels(rows, index, max_grade=4, split=split, bad=bad)
    return records
