"""A user's mistakes cost nothing: refused before anything is written, one line, no traceback.

Issue 16: nothing overwritten silently (predict), no silent defaults (segment's
lesion, thresholds, tiles, patch sizes, names, splits), empty mask sets refused.
"""

import csv
import functools
import hashlib
import json
import shutil

import numpy as np
import pytest

from rmib import io
from rmib.data import readers
from rmib.methods.segment_data import lesion_records
from rmib.predict import read_probability_png
from tests.conftest import invoke, own_copy

pytestmark = pytest.mark.timeout(600)

SEGMENTATION_IMAGES = ("A. Segmentation", "1. Original Images")
# Tiny settings: should a refusal not happen, the command trains for seconds, not minutes.
TINY_SEGMENT = [
    "--patches-per-epoch", 8, "--batch-size", 4, "--epochs", 1, "--val-fraction", 0.2,
    "--precision", "float32", "--seed", 0,
]  # fmt: skip


def tree_digest(root):
    """{relative path: sha256 of the file, or "dir"} of everything under `root` (None: absent)."""
    if not root.exists():
        return None
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@functools.cache
def built_tree_digest(root):
    """`tree_digest` of a session fixture's folder (a shared run, a dataset) as this process
    first saw it: no test writes there, so a refused command must leave it exactly so.
    Hashing the runs (900 MB) once, not before every refusal, halves what the checks cost."""
    return tree_digest(root)


def assert_refused(result, *names, exit_code=None):
    """Non-zero exit through SystemExit (no exception escaped), each of `names` in the message."""
    assert isinstance(result.exception, SystemExit), result.output
    assert result.exit_code != 0 and (exit_code is None or result.exit_code == exit_code), (
        result.output
    )
    assert "Traceback" not in result.output
    for name in names:
        assert str(name) in result.output, (name, result.output)


def _photos(synthetic_idrid, count):
    return sorted((synthetic_idrid.joinpath(*SEGMENTATION_IMAGES)).rglob("*.jpg"))[:count]


# --------------------------------------------------------------------------- nothing overwritten


def test_predict_numbers_the_outputs_of_photographs_sharing_a_name(
    segment_run, synthetic_idrid, tmp_path
):
    first, second = _photos(synthetic_idrid, 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = tmp_path / "a" / "photo.jpg"
    shutil.copy(first, a)
    b = tmp_path / "b" / "photo.png"
    io.write_image(b, io.read_image(second)[:96, :112])  # another size: which map is whose
    out = tmp_path / "out"
    result = invoke(["predict", segment_run, a, b, "--out", out, "--tile", 64])
    assert result.exit_code == 0, result.output
    assert "2 image(s) predicted" in result.output and "photo-1" in result.output

    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [f"photo-{n}_{kind}.png" for n in (1, 2) for kind in ("prob", "mask", "overlay")]
        + ["predictions.csv"]
    )
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == [str(a), str(b)]
    assert [r["prob"] for r in rows] == ["photo-1_prob.png", "photo-2_prob.png"]
    assert [r["overlay"] for r in rows] == ["photo-1_overlay.png", "photo-2_overlay.png"]
    for row, photo in zip(rows, (a, b), strict=True):
        prob = read_probability_png(out / row["prob"])
        assert prob.shape == io.read_image(photo).shape[:2]
        mask = io.read_mask(out / row["mask"])
        assert int(row["lesion_pixels"]) == int(mask.sum())
        assert float(row["mean_probability"]) == pytest.approx(prob.mean(), abs=1e-4)
    assert len({r["mean_probability"] for r in rows}) == 2  # two photographs, two predictions


def test_predict_a_folder_into_itself_twice_reads_only_the_photographs(
    segment_run, synthetic_idrid, tmp_path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "eye.jpg"
    shutil.copy(_photos(synthetic_idrid, 1)[0], photo)
    for _ in range(2):
        result = invoke(["predict", segment_run, folder, "--out", folder, "--tile", 64])
        assert result.exit_code == 0, result.output
        assert "1 image(s) predicted" in result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "eye.jpg",
        "eye_mask.png",
        "eye_overlay.png",
        "eye_prob.png",
        "predictions.csv",
    ]
    with open(folder / "predictions.csv", newline="") as f:
        assert [r["input"] for r in csv.DictReader(f)] == [str(photo)]


OUT_COMMANDS = {
    "pretrain": lambda d, out: ["pretrain", "--data", d, "--out", out],
    "segment": lambda d, out: ["segment", "--data", d, "--lesion", "EX", "--out", out],
    "predict": lambda d, out: ["predict", d, d / "photo.jpg", "--out", out],
    "evaluate": lambda d, out: ["evaluate", d, "--data", d, "--out", out],
    "grade train": lambda d, out: ["grade", "train", "--data", d, "--out", out],
    "grade predict": lambda d, out: ["grade", "predict", d, d / "photo.jpg", "--out", out],
    "grade evaluate": lambda d, out: ["grade", "evaluate", d, "--data", d, "--out", out],
    "export": lambda d, out: ["export", d, "--out", out],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_naming_an_existing_file_is_one_line(command, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"not read")
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    before = tree_digest(tmp_path)
    result = invoke(OUT_COMMANDS[command](folder, out))
    assert_refused(result, "notes.txt", "is a file", exit_code=2)
    assert sum("Error" in line for line in result.output.splitlines()) == 1
    assert tree_digest(tmp_path) == before


def test_export_never_replaces_a_folder_of_other_files(tmp_path):
    model = tmp_path / "run"
    model.mkdir()
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree_digest(tmp_path)
    result = invoke(["export", model, "--out", out])
    assert_refused(result, "documents", "no SavedModel", exit_code=2)
    assert tree_digest(tmp_path) == before


# --------------------------------------------------------------------------- no silent defaults


def test_segment_without_a_lesion_is_refused_naming_both_ways(synthetic_idrid, tmp_path):
    out = tmp_path / "run"
    result = invoke(["segment", "--data", synthetic_idrid, "--out", out, *TINY_SEGMENT])
    assert_refused(result, "--lesion", "recipe", exit_code=1)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "encoder-decoder"\npatch_size = 64\n')
    result = invoke(["segment", "--config", recipe, "--data", synthetic_idrid, "--out", out])
    assert_refused(result, "--lesion", "recipe", exit_code=1)
    assert not out.exists()
    # The recipe's lesion is enough: the next check (the patch side) speaks instead.
    recipe.write_text('lesion = "HE"\npatch_size = 100\n')
    result = invoke(["segment", "--config", recipe, "--data", synthetic_idrid, "--out", out])
    assert_refused(result, "--patch-size 100", exit_code=1)
    assert "--lesion" not in result.output and not out.exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("threshold", ["2", "1", "0", "-0.5"])
def test_threshold_outside_0_1_is_refused(command, threshold, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not read")
    args = [photo] if command == "predict" else ["--data", tmp_path]
    out = tmp_path / "out"
    result = invoke([command, tmp_path, *args, "--out", out, "--threshold", threshold])
    assert_refused(result, "'--threshold'", f"{float(threshold)} is not in the range 0<x<1")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--patch-size", 100], "--patch-size 100: the encoder-decoder takes multiples of 32"),
        (["--patch-size", 64, "--predict-tile", 100], "predict_tile must be"),
        (
            ["--patch-size", 100, "--model", "local-global", "--global-size", 64],
            "patch_size 100 is not a multiple of 2**3",
        ),
    ],
)
def test_segment_sizes_the_model_cannot_take_are_refused_first(
    flags, message, synthetic_idrid, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_digest(out)
    args = ["segment", "--data", synthetic_idrid, "--lesion", "EX", "--out", out, *flags]
    result = invoke([*args, *TINY_SEGMENT])
    assert_refused(result, message, exit_code=1)
    if "--predict-tile" in flags:
        assert "got 100" in result.output and "multiple of 32" in result.output
    assert tree_digest(out) == before


def test_predict_tile_not_a_multiple_of_32_writes_nothing(segment_run, synthetic_idrid, tmp_path):
    out = tmp_path / "out"
    photo = _photos(synthetic_idrid, 1)[0]
    result = invoke(["predict", segment_run, photo, "--out", out, "--tile", 100])
    assert_refused(result, "--tile must be a multiple of 32, got 100", exit_code=1)
    assert not out.exists()


def test_evaluate_names_the_unknown_names_and_the_valid_splits(
    segment_run, synthetic_idrid, tmp_path
):
    out = tmp_path / "eval"
    base = ["evaluate", segment_run, "--data", synthetic_idrid, "--out", out, "--tile", 64]
    result = invoke([*base, "--names", "NOPE", "--names", "IDRiD_01"])
    assert_refused(result, "'NOPE'", "IDRiD_0", exit_code=1)
    assert "'IDRiD_01'" not in result.output  # that one exists
    result = invoke([*base, "--split", "nosuch"])
    assert_refused(result, "'nosuch'", "test", "train", exit_code=1)
    assert not out.exists()


def test_pretrain_over_a_finished_run_is_refused_before_writing(
    pretrain_run, synthetic_kaggle, tmp_path
):
    before = built_tree_digest(pretrain_run)
    config = (pretrain_run / "config.toml").read_bytes()
    result = invoke(
        ["pretrain", "--data", synthetic_kaggle, "--out", pretrain_run, "--backbone", "resnet50",
         "--image-size", 32, "--epochs", 1, "--precision", "float32"]
    )  # fmt: skip
    assert_refused(result, str(pretrain_run), "--resume", exit_code=1)
    assert (pretrain_run / "config.toml").read_bytes() == config
    assert tree_digest(pretrain_run) == before


def test_segment_over_a_finished_run_is_refused_before_writing(
    segment_run, pretrain_run, synthetic_idrid
):
    before = built_tree_digest(segment_run)
    result = invoke(
        ["segment", "--data", synthetic_idrid, "--lesion", "HE", "--encoder", pretrain_run,
         "--patch-size", 32, "--out", segment_run, *TINY_SEGMENT]
    )  # fmt: skip
    assert_refused(result, str(segment_run), "--resume", exit_code=1)
    assert tree_digest(segment_run) == before


# --------------------------------------------------------------------------- empty mask sets


@pytest.fixture()
def idrid_without_exudates(synthetic_idrid, tmp_path):
    """The synthetic IDRiD tree with every hard exudate mask file all zero."""
    root = tmp_path / "idrid"
    shutil.copytree(synthetic_idrid, root)
    masks = sorted(root.rglob("*_EX.tif"))
    assert len(masks) >= 2
    for path in masks:
        io.write_image(path, np.zeros_like(io.read_image(path)))
    return root


def test_segment_refuses_a_dataset_whose_masks_are_all_zero(idrid_without_exudates, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        ["segment", "--data", idrid_without_exudates, "--lesion", "EX", "--patch-size", 32,
         "--out", out, *TINY_SEGMENT]
    )  # fmt: skip
    assert_refused(result, "EX mask files decode to all zero", "3. Hard Exudates", exit_code=1)
    assert not out.exists()


def test_evaluate_refuses_a_dataset_whose_masks_are_all_zero(
    segment_run, idrid_without_exudates, tmp_path
):
    out = tmp_path / "eval"
    result = invoke(
        ["evaluate", segment_run, "--data", idrid_without_exudates, "--out", out, "--tile", 64]
    )
    assert_refused(result, "EX mask files decode to all zero", str(idrid_without_exudates))
    assert not out.exists()


def test_single_empty_masks_are_normal(synthetic_idrid, tmp_path):
    root = tmp_path / "idrid"
    shutil.copytree(synthetic_idrid, root)
    masks = sorted(root.rglob("*_EX.tif"))
    io.write_image(masks[0], np.zeros_like(io.read_image(masks[0])))  # one empty, others not
    records = lesion_records([root], "EX")
    assert masks[0] in [r.masks["EX"] for r in records]
    dataset = readers.read_dataset(root)
    readers.require_lesion_pixels(dataset.with_lesion("EX"), "EX", root)


def test_resume_without_a_recipe_continues_the_run_with_its_own_settings(segment_run, tmp_path):
    """`--resume --out RUN` reads RUN/config.toml: the run's lesion, data and sizes, not defaults."""
    run = own_copy(segment_run, tmp_path / "resumed")
    result = invoke(["segment", "--resume", "--out", run, "--epochs", 3])
    assert result.exit_code == 0, result.output
    assert "encoder-decoder for EX:" in result.output
    assert json.loads((run / "metrics.json").read_text())["training"]["epochs_trained"] == 3
