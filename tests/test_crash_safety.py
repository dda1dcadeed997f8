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

EPOCHS = 4
KILL_AFTER = 2  # kill right after this epoch's checkpoint appears
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
def uninterrupted(tiny_kaggle, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    _run(_command(tiny_kaggle, out), out)
    return out


@pytest.fixture(scope="module")
def interrupted(tiny_kaggle, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "killed"
    killed_at = _kill_after_checkpoint(_command(tiny_kaggle, out), out, KILL_AFTER)
    assert KILL_AFTER <= killed_at < EPOCHS, f"killed too late (after epoch {killed_at})"
    assert not (out / "model.keras").exists()
    _run(_command(tiny_kaggle, out, "--resume"), out)
    return out, killed_at


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


def test_resumed_run_equals_an_uninterrupted_one(interrupted, uninterrupted):
    out, _ = interrupted
    for name in ("checkpoints/last.keras", "model.keras"):
        resumed, straight = _weights(out / name), _weights(uninterrupted / name)
        assert len(resumed) == len(straight)
        for a, b in zip(resumed, straight, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)


def test_history_matches_the_uninterrupted_run(interrupted, uninterrupted):
    from rmib.training import RunDirectory

    out, _ = interrupted
    resumed = RunDirectory(out, create=False).read_history()
    straight = RunDirectory(uninterrupted, create=False).read_history()
    for a, b in zip(resumed, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
