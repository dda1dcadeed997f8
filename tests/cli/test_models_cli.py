"""The main job through the CLI, in-process: pretrain -> segment -> predict -> evaluate."""

import json

import numpy as np
import pytest

from rmib import io, training
from tests.conftest import invoke, own_copy

pytestmark = pytest.mark.timeout(600)


def test_pretrain_writes_the_whole_run_directory(pretrain_run):
    for name in (
        "config.toml",
        "rmib.json",
        "history.csv",
        "history.png",
        "metrics.json",
        "model.keras",
        "roc_curve.png",
        "checkpoints/last.keras",
        "checkpoints/state.json",
    ):
        assert (pretrain_run / name).is_file(), name
    meta = training.read_run_metadata(pretrain_run)
    assert meta["task"] == "pretrain" and meta["backbone"] == "vgg16" and meta["cbam"] is True
    report = json.loads((pretrain_run / "metrics.json").read_text())["validation"]
    assert 0.0 <= report["accuracy"] <= 1.0
    assert np.array(report["confusion_matrix"]).sum() == report["n"] == 4
    history = (pretrain_run / "history.csv").read_text().strip().splitlines()
    assert len(history) == 3  # header + 2 epochs


def test_pretrain_resume_of_a_finished_run_trains_nothing(pretrain_run, tmp_path):
    run = own_copy(pretrain_run, tmp_path / "pretrain")  # the other tests read the original
    before = (run / "history.csv").read_text()
    result = invoke(["pretrain", "--config", run / "config.toml", "--resume"])
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.output or "already finished" in result.output
    assert (run / "history.csv").read_text() == before
    assert str(run) in result.output  # the copy resumed, not the run the other tests read


def test_segment_transfers_the_stage1_encoder(segment_run, pretrain_run):
    classifier = training.load_model(pretrain_run)
    segmenter = training.load_model(segment_run)
    encoder = classifier.get_layer("backbone")
    transferred = segmenter.get_layer("backbone")
    # The encoder stayed frozen through training: its weights are still stage 1's, bit for bit.
    for a, b in zip(encoder.weights, transferred.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not transferred.trainable_weights
    meta = training.read_run_metadata(segment_run)
    assert meta["task"] == "segment" and meta["lesion"] == "EX"
    metrics = json.loads((segment_run / "metrics.json").read_text())["validation"]
    assert 0.0 <= metrics["aupr"] <= 1.0


def test_predict_writes_maps_masks_and_overlays(segment_run, synthetic_idrid, tmp_path):
    images = sorted((synthetic_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))[:2]
    out = tmp_path / "pred"
    result = invoke(["predict", segment_run, *images, "--out", out, "--tile", 64])
    assert result.exit_code == 0, result.output
    for image in images:
        prob = io.read_image(out / f"{image.stem}_overlay.png")
        assert prob.shape[:2] == io.read_image(image).shape[:2]
        mask = io.read_mask(out / f"{image.stem}_mask.png")
        assert mask.shape == prob.shape[:2]
        assert (out / f"{image.stem}_prob.png").is_file()


def test_predict_with_planned_tiles_and_tiling_errors(segment_run, synthetic_idrid, tmp_path):
    image = next((synthetic_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))
    fixed, auto = tmp_path / "fixed", tmp_path / "auto"
    assert invoke(["predict", segment_run, image, "--out", fixed]).exit_code == 0
    result = invoke(
        [
            "predict",
            segment_run,
            image,
            "--out",
            auto,
            "--tile",
            "auto",
            "--halo",
            16,
            "--max-tile",
            64,
        ]
    )
    assert result.exit_code == 0, result.output
    from rmib.predict import read_probability_png
    from rmib.tasks import load_segmenter

    a = read_probability_png(fixed / f"{image.stem}_prob.png")
    b = read_probability_png(auto / f"{image.stem}_prob.png")
    assert a.shape == b.shape == io.read_image(image).shape[:2]
    assert np.abs(a - b).max() > 0  # the flags took effect: other tiles than the run's own
    # the CLI's planned tiles are the Python API's, flag for flag (16-bit PNG quantisation)
    segmenter = load_segmenter(segment_run, tile="auto", halo=16, max_tile=64)
    expected = segmenter.predict(io.read_image(image))
    assert segmenter.last_plan[0][0] * segmenter.last_plan[0][1] <= 64 * 64
    np.testing.assert_allclose(b, expected, atol=1 / 65535)
    for args, message in [
        (["--tile", "auto", "--overlap", "0.25"], "tiles overlap by twice --halo"),
        (["--tile", "128", "--halo", "8"], "--halo and --max-tile apply to --tile auto"),
        (["--tile", "auto", "--halo", "64", "--max-tile", "64"], "allowed (--max-tile)"),
        (["--tile", "100"], "--tile must be a multiple of 32, got 100"),
    ]:
        result = invoke(["predict", segment_run, image, "--out", tmp_path / "x", *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    result = invoke(["predict", segment_run, image, "--out", tmp_path / "x", "--tile", "big"])
    assert result.exit_code == 2 and "expected 'auto' or a number of pixels" in result.output


def test_predict_bad_image_error_and_skip(segment_run, synthetic_idrid, tmp_path):
    good = next((synthetic_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:500])
    result = invoke(["predict", segment_run, bad, "--out", tmp_path / "o1"])
    assert result.exit_code == 1
    assert "broken.jpg" in result.output and "Traceback" not in result.output
    result = invoke(
        [
            "predict",
            segment_run,
            bad,
            good,
            "--out",
            tmp_path / "o2",
            "--on-bad",
            "skip",
            "--tile",
            64,
        ]
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in (tmp_path / "o2" / "skipped.csv").read_text()
    assert (tmp_path / "o2" / f"{good.stem}_mask.png").is_file()


def test_evaluate_reports_aupr_pixel_and_region_scores(segment_run, synthetic_idrid, tmp_path):
    out = tmp_path / "eval"
    result = invoke(
        [
            "evaluate",
            segment_run,
            "--data",
            synthetic_idrid,
            "--out",
            out,
            "--split",
            "test",
            "--tile",
            64,
        ]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] >= 1
    for key in (
        "aupr",
        "aupr_11pt_trapezoid",
        "sensitivity",
        "ppv",
        "f1",
        "iou",
        "accuracy",
        "specificity",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert '"aupr_11pt_trapezoid"' in result.output
    assert set(metrics["region_f_score"]) == {"0.2", "0.35", "0.5", "0.65", "0.8"}
    assert (out / "pr_curve.png").is_file() and (out / "per_image.csv").is_file()
    assert any((out / "overlays").iterdir())


def test_segment_unknown_encoder_is_a_clear_error(synthetic_idrid, tmp_path):
    result = invoke(
        [
            "segment",
            "--data",
            synthetic_idrid,
            "--lesion",
            "EX",
            "--encoder",
            "vgg19",
            "--out",
            tmp_path / "x",
        ]
    )
    assert result.exit_code == 1
    assert "vgg19" in result.output and "vgg16" in result.output


def test_pretrain_needs_labels_of_both_classes(tmp_path):
    from rmib.data import synthetic

    root = synthetic.write_dataset(tmp_path / "k", "kaggle", 3, 64, seed=0)
    labels = root / "trainLabels.csv"
    rows = labels.read_text().strip().splitlines()
    labels.write_text("\n".join([rows[0]] + [r.split(",")[0] + ",2" for r in rows[1:]]) + "\n")
    result = invoke(["pretrain", "--data", root, "--out", tmp_path / "r", "--image-size", 64])
    assert result.exit_code == 1
    assert "both healthy" in result.output and "Traceback" not in result.output
