"""Shared tiny fixtures: synthetic datasets and models trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, or skip when this clone has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_kaggle(tmp_path_factory):
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("kaggle"), "kaggle", 16, 96, seed=1)


@pytest.fixture(scope="session")
def synthetic_idrid(tmp_path_factory):
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("idrid"), "idrid", 10, 128, seed=2)


EPOCH_SECONDS = 60.0  # what an epoch costs on `fake_clock`


@pytest.fixture
def fake_clock(monkeypatch):
    """`time.monotonic` of the time limit, advanced by EPOCH_SECONDS at the start of every
    epoch: time-limit tests count epochs, not wall-clock seconds."""
    import types

    from rmib.training import callbacks

    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(monotonic=lambda: clock.now))

    def on_epoch_begin(self, epoch, logs=None):
        clock.now += EPOCH_SECONDS

    monkeypatch.setattr(callbacks._TimeLimit, "on_epoch_begin", on_epoch_begin)
    return clock


@pytest.fixture
def eager():
    """Run tf.functions eagerly: tracing the train steps of every phase takes far longer
    than running a few tiny steps eagerly on a busy CPU."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def invoke(args):
    """Run the rmib CLI in-process; return the click Result."""
    from click.testing import CliRunner

    from rmib.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _float32_global_policy():
    """Every test starts under the float32 policy, whatever a fixture trained in before it.

    Training sets Keras' global dtype policy; without this, a test building a
    model would compute in whatever precision the last fixture used, and its
    outcome would depend on the order of the tests (and on the CPU, for "auto").
    """
    import keras

    keras.config.set_dtype_policy("float32")
    yield


def pretrain_args(data, out, precision, epochs=2, image_size=64):
    """`rmib pretrain` of a tiny VGG16-CBAM classifier, its precision explicit."""
    return [
        "pretrain", "--data", data, "--backbone", "vgg16", "--cbam", "--image-size", image_size,
        "--epochs", epochs, "--batch-size", 4, "--val-fraction", 0.25, "--out", out,
        "--seed", 0, "--precision", precision,
    ]  # fmt: skip


def segment_args(data, encoder, out, precision, epochs=2, patches=32):
    """`rmib segment` of a tiny EX encoder-decoder on `encoder`, its precision explicit."""
    return [
        "segment", "--data", data, "--lesion", "EX", "--encoder", encoder, "--patch-size", 64,
        "--patches-per-epoch", patches, "--batch-size", 8, "--epochs", epochs,
        "--val-fraction", 0.2, "--predict-tile", 128, "--out", out, "--seed", 0,
        "--precision", precision,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, synthetic_kaggle):
    """A tiny VGG16-CBAM stage-1 run in float32, trained once through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    result = invoke(pretrain_args(synthetic_kaggle, out, "float32"))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def segment_run(tmp_path_factory, synthetic_idrid, pretrain_run):
    """A tiny EX segmenter on the transferred, frozen stage-1 encoder (float32), trained once."""
    out = tmp_path_factory.mktemp("runs") / "segment"
    result = invoke(segment_args(synthetic_idrid, pretrain_run, out, "float32"))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def pretrain_run_bf16(tmp_path_factory, synthetic_kaggle):
    """The tiny stage-1 run trained under mixed_bfloat16 (emulated on CPUs without it)."""
    out = tmp_path_factory.mktemp("runs") / "pretrain-bf16"
    result = invoke(pretrain_args(synthetic_kaggle, out, "mixed_bfloat16", epochs=1))
    assert result.exit_code == 0, result.output
    assert "precision mixed_bfloat16: asked for" in result.output
    return out


@pytest.fixture(scope="session")
def segment_run_bf16(tmp_path_factory, synthetic_idrid, pretrain_run_bf16):
    """The tiny EX segmenter trained under mixed_bfloat16 on the bfloat16 stage-1 encoder."""
    out = tmp_path_factory.mktemp("runs") / "segment-bf16"
    args = segment_args(synthetic_idrid, pretrain_run_bf16, out, "mixed_bfloat16", 1, 16)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return out
