"""Messidor: any folder (recursively) with Annotation_Base*.xls|.xlsx|.csv
("Image name", "Retinopathy grade" 0-3) beside its .tif images."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

from rmib.data.readers.common import ImageIndex, visible
from rmib.data.readers.tables import label_rows, match_labels

# Messidor can sit a few folders down (Messidor/Base11/...); a bounded walk
# keeps detection fast when the user points at a big unrelated folder.
MAX_DEPTH = 4
_ANNOTATION = re.compile(r"^annotation[ _-]?base.*\.(xls|xlsx|csv)$", re.IGNORECASE)


def _messidor_annotations(root: Path, max_depth=MAX_DEPTH) -> list:
    found = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        dirnames[:] = sorted(d for d in dirnames if visible(d)) if depth < max_depth else []
        found += [Path(dirpath, f) for f in filenames if _ANNOTATION.match(f)]
    return sorted(found)


def find_parts(root, max_depth=MAX_DEPTH):
    return ["messidor"] if _messidor_annotations(root, max_depth) else []


def read(root, parts, bad):
    by_folder = collections.defaultdict(list)
    for path in _messidor_annotations(root):
        by_folder[path.parent].append(path)
    records = []
    for folder, files in sorted(by_folder.items()):
        tables = [label_rows(path, "Image name", "Retinopathy grade", bad) for path in files]
        if all(rows is None for rows in tables):
            continue  # reported; listing every image as unlabelled would bury that
        rows = [row for rows in tables if rows for row in rows]
        index = ImageIndex(folder)
        records += match_labels(rows, index, max_grade=3, split=None, bad=bad)
    return records, ()
