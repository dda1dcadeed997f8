"""Shared tiny fixtures: synthetic datasets and models trained once per test run."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

try:
    import fcntl
except ImportError:  # not on Windows: every worker builds its own
    fcntl = None

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, or skip when this clone has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (a file) against the other processes of the run."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def built_once(tmp_path_factory, name: str, build) -> Path:
    """What `build(folder)` returns, built once per test run, not once per xdist worker.

    A session fixture runs in every worker that needs it, and the trained runs
    below cost most of a minute each: the first worker to ask builds `name` in
    the run's base temporary folder (the parent of the workers' own), the
    others wait on a lock and then read the same files. Tests only read these
    folders; a test that writes into a run works on `own_copy` of it. Under a
    plain `pytest` (or without `fcntl`) the folder is the process's own.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
        root = root.parent
    folder, built = root / f"shared-{name}", root / f"shared-{name}.built"
    with _locked(root / f"shared-{name}.lock"):
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            built.write_text(str(build(folder)))
    return Path(built.read_text())


def own_copy(run: Path, destination: Path) -> Path:
    """A copy of the shared `run` at `destination` whose config.toml names the copy, so
    that a command resuming it (`--resume --out`, `--config`) writes there only."""
    shutil.copytree(run, destination)
    config = destination / "config.toml"
    config.write_text(config.read_text().replace(str(run), str(destination)))
    return destination


@pytest.fixture(scope="session")
def synthetic_kaggle(tmp_path_factory):
    from rmib.data import synthetic

    return built_once(
        tmp_path_factory,
        "kaggle",
        lambda folder: synthetic.write_dataset(folder, "kaggle", 16, 96, seed=1),
    )


@pytest.fixture(scope="session")
def synthetic_idrid(tmp_path_factory):
    from rmib.data import synthetic

    return built_once(
        tmp_path_factory,
        "idrid",
        lambda folder: synthetic.write_dataset(folder, "idrid", 10, 128, seed=2),
    )


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


@pytest.fixture(scope="module", autouse=True)
def _float32_global_policy_per_module():
    """The same for a test file's module-scoped fixtures, which pytest builds before any
    function-scoped one: a module fixture building a model (test_backbones.py's
    keras.applications twins) computed in the policy the previous file's last test set
    (bfloat16: its outputs rounded to 8 bits, seen with one xdist worker)."""
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


def _trained_once(tmp_path_factory, name, args, expected_output=""):
    """The run `invoke(args(out))` trains into `<folder>/name`, once per test run."""

    def train(folder):
        out = folder / name
        result = invoke(args(out))
        assert result.exit_code == 0, result.output
        assert expected_output in result.output
        return out

    return built_once(tmp_path_factory, name, train)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, synthetic_kaggle):
    """A tiny VGG16-CBAM stage-1 run in float32, trained once through the CLI."""
    return _trained_once(
        tmp_path_factory, "pretrain", lambda out: pretrain_args(synthetic_kaggle, out, "float32")
    )


@pytest.fixture(scope="session")
def segment_run(tmp_path_factory, synthetic_idrid, pretrain_run):
    """A tiny EX segmenter on the transferred, frozen stage-1 encoder (float32), trained once."""
    return _trained_once(
        tmp_path_factory,
        "segment",
        lambda out: segment_args(synthetic_idrid, pretrain_run, out, "float32"),
    )


@pytest.fixture(scope="session")
def pretrain_run_bf16(tmp_path_factory, synthetic_kaggle):
    """The tiny stage-1 run trained under mixed_bfloat16 (emulated on CPUs without it)."""
    return _trained_once(
        tmp_path_factory,
        "pretrain-bf16",
        lambda out: pretrain_args(synthetic_kaggle, out, "mixed_bfloat16", epochs=1),
        expected_output="precision mixed_bfloat16: asked for",
    )


@pytest.fixture(scope="session")
def segment_run_bf16(tmp_path_factory, synthetic_idrid, pretrain_run_bf16):
    """The tiny EX segmenter trained under mixed_bfloat16 on the bfloat16 stage-1 encoder."""
    return _trained_once(
        tmp_path_factory,
        "segment-bf16",
        lambda out: segment_args(synthetic_idrid, pretrain_run_bf16, out, "mixed_bfloat16", 1, 16),
    )
