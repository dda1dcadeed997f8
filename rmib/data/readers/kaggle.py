"""Kaggle/EyePACS (trainLabels.csv: image, level 0-4 + train/<image>.jpeg) and APTOS
(train.csv: id_code, diagnosis 0-4 + train_images/<id_code>.png): a grade table
beside a folder of images."""

from __future__ import annotations

from rmib.data.readers.common import ImageIndex, child_dir, entries
from rmib.data.readers.tables import label_rows, match_labels


def csv_layout_parts(csv_name, images_dir, layout):
    def find_parts(root):
        has_csv = any(p.is_file() and p.name.lower() == csv_name.lower() for p in entries(root))
        return [layout] if has_csv and child_dir(root, images_dir) else []

    return find_parts


def csv_layout_reader(csv_name, images_dir, name_column, grade_column):
    def read(root, parts, bad):
        table = next(p for p in entries(root) if p.name.lower() == csv_name.lower())
        rows = label_rows(table, name_column, grade_column, bad)
        if rows is None:
            return [], ()
        index = ImageIndex(child_dir(root, images_dir))
        return match_labels(rows, index, max_grade=4, split=None, bad=bad), ()

    return read
