"""`--tta` end to end: a run's choice in its metadata, predict's default and override, the
exported ``segment_image`` against the Python predictor, `rmib segment --tta`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib import io, tasks, training
from rmib.data.pipeline import Preprocessing
from rmib.predict import read_probability_png
from tests.conftest import invoke

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    """A run of a fixed, non-symmetric 3x3 convolution that chose ``tta = "flips"``."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    rng = np.random.default_rng(0)
    conv.set_weights(
        [rng.normal(0, 0.01, (3, 3, 3, 1)).astype(np.float32), np.array([-1.0], np.float32)]
    )
    run = training.RunDirectory(tmp_path_factory.mktemp("runs") / "tta")
    run.write_metadata(
        {
            "task": "segment",
            "model": "encoder-decoder",
            "lesion": "EX",
            "preprocessing": Preprocessing(method="none").to_dict(),
            "predict_tile": 32,
            "size_multiple": 32,
            "precision": "float32",
            "tta": "flips",
        }
    )
    run.save_model(model)
    return run.path


def test_predict_defaults_to_the_runs_tta_and_the_flag_overrides_it(tta_run, tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    io.write_image(path, image)
    assert tasks.load_segmenter(tta_run).tta == "flips"
    flips = tasks.load_segmenter(tta_run).predict(image)
    none = tasks.load_segmenter(tta_run, tta="none").predict(image)
    assert np.abs(flips - none).max() > 1e-4  # the model is not symmetric
    result = invoke(["predict", tta_run, path, "--out", tmp_path / "default"])
    assert result.exit_code == 0, result.output
    assert "tta flips: 4 passes a photograph" in result.output
    result = invoke(["predict", tta_run, path, "--out", tmp_path / "none", "--tta", "none"])
    assert result.exit_code == 0 and "tta" not in result.output, result.output
    saved = {
        name: read_probability_png(tmp_path / name / "photo_prob.png")
        for name in ("default", "none")
    }
    np.testing.assert_allclose(saved["default"], flips, atol=1e-4)
    np.testing.assert_allclose(saved["none"], none, atol=1e-4)
    result = invoke(["predict", tta_run, path, "--out", tmp_path / "bad", "--tta", "flip"])
    assert result.exit_code == 2 and "'flip' is not one of" in result.output
    assert "flips-rot90" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("tta", ["flips", "flips-rot90"])
def test_exported_segment_image_averages_the_runs_flips(tta_run, tmp_path, tta):
    # The export serves what rmib predict serves: the run's tta, held to it by --check.
    run = tmp_path / "run"
    run.mkdir()
    metadata = json.loads((tta_run / "rmib.json").read_text())
    training.RunDirectory(run).write_metadata({**metadata, "tta": tta})
    training.RunDirectory(run).save_model(training.load_model(tta_run))
    result = tasks.export_model(run, tmp_path / "sm", check=True)
    assert max(result.differences.values()) < 1e-5, result.differences
    served = tf.saved_model.load(str(tmp_path / "sm"))
    meta = json.loads(served.signatures["metadata"]()["json"].numpy().decode())
    assert meta["tta"] == tta
    image = np.random.default_rng(2).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    fov = np.ones((45, 77), np.uint8)
    fov[:9, :11] = 0
    prob = served.signatures["segment_image"](image=tf.constant(image), fov=tf.constant(fov))
    prob = prob["probability"].numpy()
    expected = tasks.load_segmenter(run).predict_prepared(image, fov)
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    single = tasks.load_segmenter(run, tta="none").predict_prepared(image, fov)
    assert np.abs(prob - single).max() > 1e-4


def test_segment_stores_tta_and_validates_with_it(synthetic_idrid, tmp_path):
    out = tmp_path / "seg"
    args = ["segment", "--data", synthetic_idrid, "--lesion", "EX", "--patch-size", 32]
    args += ["--patches-per-epoch", 8, "--batch-size", 4, "--epochs", 1, "--val-fraction", 0.2]
    args += ["--predict-tile", 64, "--precision", "float32", "--tta", "flips", "--out", out]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "rmib.json").read_text())["tta"] == "flips"
    assert 'tta = "flips"' in (out / "config.toml").read_text()
    assert tasks.load_segmenter(out).tta == "flips"
    bad = invoke(
        [*args[:-2], "--out", tmp_path / "bad", "--model", "dual2net", "--tta", "flips-rot90"]
    )
    assert bad.exit_code == 1 and "960x1440" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
