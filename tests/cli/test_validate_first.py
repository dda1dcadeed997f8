"""Validate, then write: every command checks its options, files, encoder and weights
before it reads a dataset or creates anything; `--dry-run` shows what a training would do.

Issue 16, deliverable 1 (and the training logs of deliverable 5 through the CLI).
"""

from __future__ import annotations

import pytest

from rmib.training import RunDirectory
from tests.cli.test_user_mistakes import (
    TINY_SEGMENT,
    assert_refused,
    built_tree_digest,
    tree_digest,
)
from tests.conftest import PROJECT_ROOT, invoke

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
def watched(tmp_path, synthetic_idrid, synthetic_kaggle, pretrain_run, segment_run):
    """Paths whose every file a refused command must leave as it was, and their digest."""
    roots = [tmp_path, synthetic_idrid, synthetic_kaggle, pretrain_run, segment_run]
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "IDRiD_01.jpg").write_text("a user's photograph")
    missing = tmp_path / "nope.h5"
    (tmp_path / "grading.toml").write_text(f'global_net = "vgg16"\nglobal_weights = "{missing}"\n')
    return roots, [tree_digest(tmp_path), *map(built_tree_digest, roots[1:])]


def _pretrain(d, tmp):
    return ["pretrain", "--data", d["kaggle"], "--out", tmp / "run", "--image-size", 32]


def _segment(d, tmp):
    return ["segment", "--data", d["idrid"], "--lesion", "EX", "--out", tmp / "run", *TINY_SEGMENT]


# (command line, words of the message). `d` holds the fixtures' paths, `tmp` the test's folder.
REFUSALS = {
    "pretrain missing weights": (
        lambda d, tmp: [*_pretrain(d, tmp), "--weights", tmp / "nope.h5"],
        ["nope.h5", "weights file not found"],
    ),
    "pretrain weights of another format": (
        lambda d, tmp: [*_pretrain(d, tmp), "--weights", tmp / "notes.txt"],
        ["notes.txt", "not a weights file"],
    ),
    "segment unknown encoder": (
        lambda d, tmp: [*_segment(d, tmp), "--encoder", "nosuch"],
        ["'nosuch'", "valid backbones: resnet50, vgg16"],
    ),
    "segment missing weights": (
        lambda d, tmp: [*_segment(d, tmp), "--encoder", "vgg16", "--weights", tmp / "nope.h5"],
        ["nope.h5", "weights file not found"],
    ),
    "segment encoder of a segment run": (
        lambda d, tmp: [*_segment(d, tmp), "--encoder", d["segment_run"]],
        ["a 'segment' run, expected a `rmib pretrain` run"],
    ),
    "segment dual2net fine-tuning after epochs": (
        lambda d, tmp: [*_segment(d, tmp), "--model", "dual2net", "--fine-tune-after", 1],
        ["fine_tune_after does not apply to dual2net"],
    ),
    "grade train missing weights": (
        lambda d, tmp: [
            "grade",
            "train",
            "--data",
            d["idrid"],
            "--out",
            tmp / "run",
            "--config",
            tmp / "grading.toml",  # global_weights: nope.h5
        ],  # fmt: skip
        ["nope.h5", "weights file not found"],
    ),
    "predict a folder that is no run": (
        lambda d, tmp: ["predict", tmp / "folder", d["photo"], "--out", tmp / "out"],
        ["folder: not an rmib run directory"],
    ),
    "evaluate a folder that is no run": (
        lambda d, tmp: ["evaluate", tmp / "folder", "--data", d["idrid"], "--out", tmp / "out"],
        ["folder: not an rmib run directory"],
    ),
    "export a folder that is no run": (
        lambda d, tmp: ["export", tmp / "folder", "--out", tmp / "out"],
        ["folder"],
    ),
    "data synth into a folder of files": (
        lambda d, tmp: ["data", "synth", tmp / "folder", "--count", 2, "--size", 32],
        ["folder holds files", "new or empty folder"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_command_leaves_every_file_as_it_was(
    case, watched, tmp_path, synthetic_idrid, synthetic_kaggle, segment_run
):
    photo = sorted(synthetic_idrid.rglob("*.jpg"))[0]
    paths = {
        "idrid": synthetic_idrid,
        "kaggle": synthetic_kaggle,
        "segment_run": segment_run,
        "photo": photo,
    }
    args, words = REFUSALS[case]
    result = invoke(args(paths, tmp_path))
    assert_refused(result, *words)
    # Refused before the data was read: nothing says what training would use.
    assert "training images" not in result.output and "training and" not in result.output
    roots, before = watched
    assert [tree_digest(root) for root in roots] == before


def test_pretrain_dry_run_shows_config_data_and_run_directory(synthetic_kaggle, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        ["pretrain", "--data", synthetic_kaggle, "--out", out, "--image-size", 32, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "# resolved configuration (config.toml)" in result.output
    assert "image_size = 32" in result.output and "[train]" in result.output
    assert "16 labelled images" in result.output and "13 for training, 3 for validation" in (
        result.output
    )
    assert f"{out}: does not exist yet" in result.output
    assert sorted(tmp_path.iterdir()) == []


def test_segment_dry_run_writes_nothing_even_into_a_run_it_would_resume(
    synthetic_idrid, pretrain_run, segment_run, tmp_path
):
    before = built_tree_digest(segment_run)
    result = invoke(
        ["segment", "--resume", "--out", segment_run, "--epochs", 5, "--dry-run"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "epochs = 5" in result.output and 'lesion = "EX"' in result.output
    assert "encoder-decoder for EX: 7 images annotated for it" in result.output
    assert "--resume would continue it" in result.output
    assert tree_digest(segment_run) == before
    out = tmp_path / "new"
    args = ["segment", "--data", synthetic_idrid, "--lesion", "HE", "--encoder", pretrain_run]
    result = invoke([*args, "--patch-size", 64, "--out", out, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{out}: does not exist yet" in result.output and not out.exists()


def test_grade_train_dry_run_writes_nothing(synthetic_idrid, tmp_path):
    out = tmp_path / "run"
    result = invoke(["grade", "train", "--data", synthetic_idrid, "--out", out, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "graded images (the global net)" in result.output
    assert 'global_net = "yang"' in result.output
    assert not out.exists()


def test_training_into_a_log_prints_a_line_per_epoch_and_draws_history(
    synthetic_kaggle, tmp_path, eager
):
    out = tmp_path / "run"
    result = invoke(
        ["pretrain", "--data", synthetic_kaggle, "--out", out, "--image-size", 32,
         "--epochs", 2, "--batch-size", 4, "--precision", "float32", "--seed", 0]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b" not in result.output
    epochs = [line.split(" ")[1] for line in result.output.splitlines() if line.startswith("epoch")]
    assert epochs == ["1/2", "2/2"]
    assert "val_auc" in result.output
    assert RunDirectory(out).history_plot_path.is_file()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "false"),
        (["--class-weights"], "true"),
        (["--config", "pretrain/vgg16_cbam.toml", "--weights", "none"], "true"),
        (["--config", "pretrain/vgg16_cbam.toml", "--weights", "none", "--no-class-weights"],
         "false"),
    ],
)  # fmt: skip
def test_pretrain_class_weights_flag_overrides_the_recipe(
    synthetic_kaggle, tmp_path, flags, expected
):
    flags = [str(PROJECT_ROOT / f) if f.endswith(".toml") else f for f in flags]
    result = invoke(
        ["pretrain", "--data", synthetic_kaggle, "--out", tmp_path / "run", "--image-size", 32,
         *flags, "--dry-run"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"class_weights = {expected}" in result.output
