"""`rmib data inspect` and `rmib data synth` through the real CLI group."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import rmib.data
from rmib import io
from rmib.cli import cli

pytestmark = pytest.mark.timeout(240)

PROJECT_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
IDRID_LESION_FOLDERS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}


@pytest.fixture(autouse=True)
def _restore_max_pixels():
    yield
    io.set_max_pixels(None)


def run(*args):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def write_image(path, size=(32, 24)):
    width, height = size
    # Noise, so a JPEG's pixel data outweighs its header and a cut tail leaves the header whole.
    rng = np.random.default_rng(len(str(path)))
    io.write_image(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return Path(path)


def kaggle_tree(root, grades, sizes=None):
    for name in grades:
        write_image(root / "train" / f"{name}.jpeg", (sizes or {}).get(name, (32, 24)))
    lines = ["image,level"] + [f"{n},{g}" for n, g in grades.items()]
    (root / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    return root


def idrid_tree(root, images):
    """images: {(split folder, name): [lesion codes with a mask]}."""
    seg = root / "A. Segmentation"
    for (split, name), codes in images.items():
        write_image(seg / "1. Original Images" / split / f"{name}.jpg")
        for code, folder in IDRID_LESION_FOLDERS.items():
            target = seg / "2. All Segmentation Groundtruths" / split / folder
            target.mkdir(parents=True, exist_ok=True)
            if code in codes:
                mask = np.zeros((24, 32, 3), np.uint8)
                mask[3:7, 4:9, 0] = 255
                io.write_image(target / f"{name}_{code}.tif", mask)
    return root


def truncate(path, keep=-40):
    path.write_bytes(path.read_bytes()[:keep])


def lines_naming(output, path):
    return [line for line in output.splitlines() if str(path) in line]


# ----------------------------------------------------------------------------
# inspect


def test_inspect_prints_layout_grades_and_sizes(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 0, "c": 2, "d": 4}, sizes={"d": (40, 30)})
    result = run("inspect", tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Layout:  kaggle" in out and "Images:  4" in out
    assert re.search(r"grade 0\s+2\n", out) and re.search(r"grade 4\s+1\n", out)
    assert "grade 1" not in out and "grade 3" not in out
    assert re.search(r"label healthy\s+2\n", out) and re.search(r"label lesion\s+2\n", out)
    assert "  32x24: 3\n  40x30: 1" in out
    assert "Every image and mask decoded: no bad files." in out


def test_inspect_counts_lesions_per_split(tmp_path):
    idrid_tree(
        tmp_path,
        {
            ("a. Training Set", "IDRiD_01"): ["MA", "SE", "OD"],
            ("a. Training Set", "IDRiD_02"): ["MA", "OD"],
            ("b. Testing Set", "IDRiD_55"): ["EX", "OD"],
        },
    )
    result = run("inspect", tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Layout:  idrid-segmentation" in out
    assert re.search(r"\n\s+all\s+train\s+test\n", out)
    assert re.search(r"images\s+3\s+2\s+1\n", out)
    assert re.search(r"MA microaneurysms\s+2/3\s+2/2\s+0/1\n", out)
    assert re.search(r"SE soft exudates\s+1/3\s+1/2\s+0/1\n", out)
    assert re.search(r"EX hard exudates\s+1/3\s+0/2\s+1/1\n", out)
    assert re.search(r"HE haemorrhages\s+0/3\s+0/2\s+0/1\n", out)


def test_inspect_json(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 3})
    result = run("inspect", tmp_path, "--json", "--quick")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "kaggle" and summary["images"] == 2
    assert summary["grades"] == {"0": 1, "3": 1}
    assert summary["sizes"] == {"32x24": 2}
    assert summary["problems"] == [] and summary["decoded"] is False


def test_inspect_names_every_bad_file_on_its_own_line(tmp_path):
    idrid_tree(
        tmp_path,
        {
            ("a. Training Set", "IDRiD_01"): ["EX"],
            ("a. Training Set", "IDRiD_02"): ["EX"],
            ("a. Training Set", "IDRiD_03"): ["EX"],
        },
    )
    images = tmp_path / "A. Segmentation" / "1. Original Images" / "a. Training Set"
    truths = tmp_path / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"
    truncate(images / "IDRiD_01.jpg")
    truncate(images / "IDRiD_03.jpg")
    wrong_size = truths / "3. Hard Exudates" / "IDRiD_02_EX.tif"
    io.write_image(wrong_size, np.zeros((20, 32), np.uint8))
    result = run("inspect", tmp_path)
    assert result.exit_code == 1
    for path, reason in (
        (images / "IDRiD_01.jpg", "truncated JPEG"),
        (images / "IDRiD_03.jpg", "truncated JPEG"),
        (wrong_size, "mask is 32x20 but its image is 32x24"),
    ):
        (line,) = lines_naming(result.stdout, path)
        assert reason in line
    assert "Bad files (3):" in result.stdout
    assert result.stderr.strip() == f"Error: 3 bad file(s) in {tmp_path} (each listed above)"


def test_quick_does_not_decode(tmp_path, monkeypatch):
    kaggle_tree(tmp_path, {"a": 0, "b": 1})
    truncate(tmp_path / "train" / "b.jpeg")

    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(io, "read_image", refuse)
    monkeypatch.setattr(io, "read_mask", refuse)
    result = run("inspect", tmp_path, "--quick")
    assert result.exit_code == 0, result.output
    assert "listed (headers read, not decoded): no bad files" in result.stdout
    monkeypatch.undo()
    result = run("inspect", tmp_path)
    assert result.exit_code == 1 and len(lines_naming(result.stdout, "b.jpeg")) == 1


def test_on_bad_skip_lists_bad_files_and_exits_zero_when_some_are_usable(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 1})
    truncate(tmp_path / "train" / "b.jpeg")
    result = run("inspect", tmp_path, "--on-bad", "skip")
    assert result.exit_code == 0
    assert "b.jpeg: truncated JPEG" in result.stdout
    truncate(tmp_path / "train" / "a.jpeg")
    assert run("inspect", tmp_path, "--on-bad", "skip").exit_code == 1


def test_bad_labels_are_listed(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 1})
    write_image(tmp_path / "train" / "stray.jpeg")
    with open(tmp_path / "trainLabels.csv", "a") as f:
        f.write("ghost,2\nb,9\n")
    result = run("inspect", tmp_path, "--quick")
    assert result.exit_code == 1
    out = result.stdout
    (ghost,) = [line for line in out.splitlines() if "'ghost'" in line]
    assert "trainLabels.csv: row 4: image 'ghost' not found in" in ghost
    assert "trainLabels.csv: row 5: grade 9 for 'b' is out of range" in out
    assert len(lines_naming(out, tmp_path / "train" / "stray.jpeg")) == 1


def test_label_table_without_the_columns(tmp_path):
    kaggle_tree(tmp_path, {"a": 0})
    (tmp_path / "trainLabels.csv").write_text("name,grade\na,0\n")
    result = run("inspect", tmp_path)
    assert result.exit_code == 1
    assert "trainLabels.csv: missing column(s) 'image', 'level'" in result.stdout
    assert "expected a table with columns 'image' and 'level'" in result.stdout


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda root: None, (), "the folder is empty"),
        (lambda root: (root / "x.txt").write_text("x"), (), "no known dataset layout found"),
        (lambda root: kaggle_tree(root, {"a": 0}), ("--layout", "ddr"), "not in the ddr layout"),
    ],
)
def test_unusable_folders_fail_in_one_line(tmp_path, setup, args, message):
    setup(tmp_path)
    result = run("inspect", tmp_path, *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stderr.startswith(f"Error: {tmp_path}")


def test_max_pixels_refuses_large_images(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 1})
    result = run("inspect", tmp_path, "--quick", "--max-pixels", "100")
    assert result.exit_code == 1
    for name in ("a.jpeg", "b.jpeg"):
        (line,) = lines_naming(result.stdout, name)
        assert "32x24 = 768 pixels, more than the limit of 100" in line


# ----------------------------------------------------------------------------
# synth


def test_synth_calls_the_writer_and_reports_what_it_wrote(tmp_path, monkeypatch):
    calls = []

    def write_dataset(out, layout, count, size, seed):
        calls.append((Path(out), layout, count, size, seed))
        return kaggle_tree(Path(out), {f"s{i}": i % 5 for i in range(count)})

    fake = types.ModuleType("rmib.data.synthetic")
    fake.write_dataset = write_dataset
    monkeypatch.setitem(sys.modules, "rmib.data.synthetic", fake)
    monkeypatch.setattr(rmib.data, "synthetic", fake, raising=False)
    out = tmp_path / "synthetic"
    result = run("synth", out, "--layout", "kaggle", "--count", 3, "--size", 32, "--seed", 7)
    assert result.exit_code == 0, result.output
    assert calls == [(out, "kaggle", 3, 32, 7)]
    assert f"Wrote a synthetic kaggle dataset to {out}" in result.stdout
    assert "Images:  3" in result.stdout and "32x24: 3" in result.stdout


@pytest.mark.parametrize(
    "layout", ["idrid", "kaggle", "messidor", "ddr", "folder", "aptos", "e-ophtha"]
)
def test_synthetic_datasets_inspect_clean(tmp_path, layout):
    out = tmp_path / layout
    result = run("synth", out, "--layout", layout, "--count", 4, "--size", 32, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert f"Wrote a synthetic {layout} dataset" in result.stdout
    images = int(re.search(r"Images:\s+(\d+)", result.stdout).group(1))
    assert images >= 4
    # Full decode: every image and mask of the writer's tree reads, masks at image size.
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == images and summary["problems"] == []
    assert summary["sizes"] == {"32x32": images}


# ----------------------------------------------------------------------------
# Real samples (../shared/data), skipped when absent


def _shared(name):
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def test_real_idrid_sample_full_decode():
    root = _shared("idrid-sample")
    truths = root / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"
    result = run("inspect", root)
    # Exit 0 after a full decode also means each mask has its image's size.
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Layout:  idrid-segmentation" in out and "Images:  10" in out
    assert "  4288x2848: 10\n" in out
    for code, folder in IDRID_LESION_FOLDERS.items():
        present = len(list((truths / folder).glob(f"IDRiD_*_{code}.tif")))
        assert re.search(rf"\n  {code} [a-z ]+\s+{present}/10\s+{present}/10\n", out), code
    assert "SE soft exudates" in out and "no bad files" in out


def test_real_eyepacs_sample_quick_json():
    root = _shared("eyepacs-sample")
    result = run("inspect", root, "--quick", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "kaggle" and summary["images"] == 25
    assert summary["grades"] == {str(g): 5 for g in range(5)}
    assert summary["labels"] == {"healthy": 5, "lesion": 20}
    assert sum(summary["sizes"].values()) == 25
