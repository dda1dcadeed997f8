"""Untrusted models: a `.keras` file that would run Python code is refused unless asked.

A Lambda layer stores Python bytecode that Keras runs while loading; `rmib
predict` refuses such a file with a message naming `--unsafe-load`, and loads
and runs it with that flag.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from rmib.cli import cli
from rmib.training import RunDirectory, read_run_metadata

pytestmark = pytest.mark.timeout(600)

CONSTANT = 0.25  # what the Lambda layer below outputs everywhere


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory, segment_run):
    """A segmentation `.keras` file (the metadata of a real run) whose model is a Lambda."""
    keras.mixed_precision.set_global_policy("float32")
    inputs = keras.Input((None, None, 3))
    # The function must be self-contained: its bytecode is loaded without this module's globals.
    outputs = keras.layers.Lambda(
        lambda x: x[..., :1] * 0.0 + 0.25, output_shape=(None, None, 1), name="code"
    )(inputs)
    model = keras.Model(inputs, outputs)
    path = tmp_path_factory.mktemp("untrusted") / "from the internet.keras"
    RunDirectory(path.parent, create=False).save_model(model, path, read_run_metadata(segment_run))
    return path


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(path), image)
    return path


def test_predict_refuses_a_lambda_layer(lambda_model, photo, tmp_path):
    out = tmp_path / "out"
    result = run_cli("predict", lambda_model, photo, "--out", out, "--tile", 64)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert "--unsafe-load" in result.output
    assert lambda_model.name in result.output
    assert "Lambda" in result.output
    assert not out.exists() or not list(out.glob("*_prob.png"))


def test_predict_runs_it_with_unsafe_load(lambda_model, photo, tmp_path):
    out = tmp_path / "out"
    result = run_cli("predict", lambda_model, photo, "--out", out, "--tile", 64, "--unsafe-load")
    assert result.exit_code == 0, result.output
    assert "1 image(s) predicted" in result.output
    prob = cv2.imdecode(np.fromfile(out / "photo_prob.png", np.uint8), cv2.IMREAD_UNCHANGED)
    assert prob.shape == (40, 56)
    # The Lambda's constant, quantized to 16 bits: its code really ran. (The
    # segmenter zeroes what its field-of-view mask leaves out of the photograph.)
    values = prob / 65535.0
    inside = np.abs(values - CONSTANT) <= 1 / 65535
    assert np.all(inside | (values == 0))
    assert inside.mean() > 0.9


def test_evaluate_refuses_it_too(lambda_model, synthetic_idrid, tmp_path):
    result = run_cli("evaluate", lambda_model, "--data", synthetic_idrid, "--out", tmp_path / "e")
    assert result.exit_code == 1, result.output
    assert "--unsafe-load" in result.output and "Traceback" not in result.output
