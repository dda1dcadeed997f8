"""The one JSON / CSV / skipped-file writer (rmib.io): exact contents."""

import json
import math

import numpy as np

from rmib import io


def test_write_json_makes_numpy_and_non_finite_values_json(tmp_path):
    data = {"aupr": np.float32(0.5), "n": np.int64(3), "nan": math.nan, 1: (1, np.inf)}
    path = io.write_json(tmp_path / "sub" / "metrics.json", data)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == {"aupr": 0.5, "n": 3, "nan": None, "1": [1, None]}


def test_write_json_writes_other_objects_as_text(tmp_path):
    path = io.write_json(tmp_path / "a.json", {"root": tmp_path})
    assert json.loads(path.read_text()) == {"root": str(tmp_path)}


def test_write_csv_of_dicts_takes_every_column_in_order_of_first_use(tmp_path):
    rows = [{"name": "a", "f1": 0.5}, {"name": "b", "iou": 1}]
    path = io.write_csv(tmp_path / "rows.csv", rows)
    assert path.read_bytes() == b"name,f1,iou\na,0.5,\nb,,1\n"


def test_write_csv_of_sequences_with_a_header(tmp_path):
    path = io.write_csv(tmp_path / "t.csv", [("x, y", 1), ("é", 2)], ["image", "level"])
    assert path.read_text(encoding="utf-8") == 'image,level\n"x, y",1\né,2\n'


def test_write_skipped(tmp_path):
    path = io.write_skipped(tmp_path, [(tmp_path / "bad.jpg", "not an image")])
    assert path == tmp_path / "skipped.csv"
    assert path.read_text() == f"file,reason\n{tmp_path / 'bad.jpg'},not an image\n"
