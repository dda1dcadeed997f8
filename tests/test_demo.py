"""`make demo`'s first steps (synthesise, inspect, contact sheet) on a tiny dataset.

The full main job (stage 1, stage 2, predict, evaluate, export) is what the
session fixtures, the CLI tests and the notebooks exercise piece by piece.
"""

import pytest

from rmib import demo, io
from rmib.data import readers

pytestmark = pytest.mark.timeout(120)


def test_quick_demo_writes_both_datasets_and_the_contact_sheet(tmp_path, capsys):
    argv = ["--quick", "--out", str(tmp_path), "--count", "4", "--size", "128"]
    assert demo.main([*argv, "--stage1-count", "6", "--stage1-size", "64"]) == 0
    sheet = io.read_image(tmp_path / "contact_sheet.png")
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.std() > 0
    idrid = readers.read_dataset(tmp_path / "data" / "idrid")
    kaggle = readers.read_dataset(tmp_path / "data" / "kaggle")
    assert idrid.layout == "idrid" and sum(bool(r.masks) for r in idrid.records) == 4
    assert (kaggle.layout, len(kaggle)) == ("kaggle", 6)
    assert {r.label for r in kaggle.records} == {0, 1}  # both classes for stage 1
    assert "no bad files" in capsys.readouterr().out
