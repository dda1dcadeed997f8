"""Crash safety: a training process killed with SIGKILL resumes to the same weights.

A real `rmib pretrain` subprocess is killed right after its k-th checkpoint
(no chance to clean up, as after a power cut or an OOM kill), then restarted
with `--resume`; the finished run must equal an uninterrupted one with the
same seed, weight for weight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(900)
# Each subprocess run writes ~180 MB VGG16 + Adam checkpoints per epoch: minutes on a
# busy machine. The in-process dropout test below covers the fix in the fast suite.
slow = pytest.mark.slow

EPOCHS = 3
KILL_AFTER = 1  # kill right after this epoch's checkpoint appears
RUN_TIMEOUT = 300  # seconds per subprocess


@pytest.fixture(scope="module")
def tiny_kaggle(tmp_path_factory):
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("kaggle"), "kaggle", 6, 64, seed=3)


def _command(data: Path, out: Path, *extra) -> list[str]:
    return [
        sys.executable, "-m", "rmib", "pretrain", "--data", str(data), "--out", str(out),
        "--backbone", "vgg16", "--image-size", "32", "--epochs", str(EPOCHS),
        "--batch-size", "2", "--val-fraction", "0.34", "--deterministic",
        "--precision", "float32", "--seed", "0", *extra,
    ]  # fmt: skip


def _environment() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command, out: Path) -> subprocess.CompletedProcess:
    """Run `command` to completion (bounded by RUN_TIMEOUT) and check it succeeded."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_environment()
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def _state_epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "state.json").read_text())["epoch"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_after_checkpoint(command, out: Path, epoch: int) -> int:
    """Start `command`, SIGKILL it once state.json reports `epoch`; return the epoch seen."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment()
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while _state_epoch(out) < epoch:
            if process.poll() is not None:
                pytest.fail(f"training ended before epoch {epoch}: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of epoch {epoch} within {RUN_TIMEOUT} s")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()  # no-op when already dead
        process.wait(timeout=30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return _state_epoch(out)


def _weights(path: Path) -> list[np.ndarray]:
    from rmib.training import load_model

    return load_model(path).get_weights()


@pytest.fixture(scope="module")
def runs(tiny_kaggle, tmp_path_factory):
    """(uninterrupted run, killed-and-resumed run, epoch it was killed after).

    The uninterrupted run trains in the background meanwhile, to halve the wall time.
    """
    straight = tmp_path_factory.mktemp("runs") / "straight"
    killed = tmp_path_factory.mktemp("runs") / "killed"
    background = subprocess.Popen(
        _command(tiny_kaggle, straight),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    try:
        killed_at = _kill_after_checkpoint(_command(tiny_kaggle, killed), killed, KILL_AFTER)
        assert KILL_AFTER <= killed_at < EPOCHS, f"killed too late (after epoch {killed_at})"
        assert not (killed / "model.keras").exists()
        _run(_command(tiny_kaggle, killed, "--resume"), killed)
        _, stderr = background.communicate(timeout=RUN_TIMEOUT)
        assert background.returncode == 0, stderr
    finally:
        background.kill()
        background.wait(timeout=30)
    return straight, killed, killed_at


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return runs[0]


@pytest.fixture(scope="module")
def interrupted(runs):
    return runs[1], runs[2]


@slow
def test_resumed_run_completes_with_each_epoch_once(interrupted):
    from rmib.training import RunDirectory, load_model

    out, killed_at = interrupted
    run = RunDirectory(out, create=False)
    epochs = [row["epoch"] for row in run.read_history()]
    assert epochs == list(range(1, EPOCHS + 1))
    assert run.read_state()["epoch"] == EPOCHS
    assert load_model(run.checkpoint_path("last")).count_params() > 0
    assert (out / "model.keras").is_file()
    # No temporary file of an interrupted atomic write is left behind.
    assert not [p.name for p in out.rglob(".*") if p.suffix in (".tmp", ".keras")]


@slow
def test_resumed_run_equals_an_uninterrupted_one(interrupted, uninterrupted):
    out, _ = interrupted
    for name in ("checkpoints/last.keras", "model.keras"):
        resumed, straight = _weights(out / name), _weights(uninterrupted / name)
        assert len(resumed) == len(straight)
        for a, b in zip(resumed, straight, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)


@slow
def test_history_matches_the_uninterrupted_run(interrupted, uninterrupted):
    from rmib.training import RunDirectory

    out, _ = interrupted
    resumed = RunDirectory(out, create=False).read_history()
    straight = RunDirectory(uninterrupted, create=False).read_history()
    for a, b in zip(resumed, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)


def _dropout_model():
    import keras

    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def test_resume_restores_the_dropout_random_state(tmp_path):
    """Keras does not save seed-generator states; the runner's checkpoint state does."""
    import keras
    import tensorflow as tf

    from rmib.config import TrainConfig
    from rmib.training import RunDirectory, fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # same batches every epoch
    cfg = TrainConfig(
        epochs=3, batch_size=4, monitor="loss", precision="float32", strategy="default",
        seed=0, tensorboard=False, learning_rate=0.05,
    )  # fmt: skip

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    straight, _ = fit(
        _dropout_model, data, config=cfg, run_dir=tmp_path / "a", loss="mse", verbose=0
    )
    fit(_dropout_model, data, config=cfg, run_dir=tmp_path / "b", loss="mse", verbose=0,
        extra_callbacks=[StopAfterFirstEpoch()])  # fmt: skip
    state = RunDirectory(tmp_path / "b").read_state()
    assert state["epoch"] == 1
    assert state["seed_generators"] and state["seed_generators"][0][1] == 4  # 4 steps drawn
    resumed, _ = fit(
        _dropout_model, data, config=cfg, run_dir=tmp_path / "b", loss="mse", verbose=0, resume=True
    )
    assert len(resumed.get_weights()) == len(straight.get_weights())
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
