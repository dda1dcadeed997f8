"""Crash safety: a training process killed with SIGKILL resumes to the same weights.

A real rmib training subprocess is killed right after its k-th checkpoint
(mid-way through the next epoch, with no chance to clean up, as after a power
cut or an OOM kill), then restarted with `--resume`; the finished run must hold
each epoch once, leave no temporary file, and equal an uninterrupted one with
the same seed, weight for weight.

The fast scenario (in `make test`) trains the GlobalNet of the local-global
U-Net (`rmib segment --model local-global --phases global`) with 4 base
filters: ~140 kB checkpoints, the same runner, resume and atomic writes as every
other command. The VGG16 `rmib pretrain` scenario (~180 MB checkpoints per
epoch) is the same test at full weight, marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)

EPOCHS = 3
KILL_AFTER = 1  # kill right after this epoch's checkpoint appears
RUN_TIMEOUT = 300  # seconds per subprocess
TRAINING = [
    "--epochs", str(EPOCHS), "--batch-size", "2", "--deterministic", "--precision", "float32",
    "--seed", "0",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One training command: its synthetic dataset, its arguments, recipe and phase."""

    layout: str
    count: int
    image_size: int
    data_seed: int
    arguments: tuple
    recipe: str = ""  # a TOML recipe passed with --config
    phase: str | None = None  # the phase whose files hold the run's checkpoints

    def command(self, data: Path, out: Path, *extra) -> list[str]:
        """The command line training in `out` (its recipe is written beside `out`)."""
        command = [sys.executable, "-m", "rmib", *self.arguments, "--data", str(data)]
        if self.recipe:
            recipe = out.parent / f"{out.name}.toml"
            recipe.write_text(self.recipe)
            command += ["--config", str(recipe)]
        return [*command, "--out", str(out), *TRAINING, *extra]


# The GlobalNet of the local-global U-Net, one pooling level, 4-16 filters: the
# first step's tracing dominates (a few seconds), checkpoints are ~140 kB. Five
# training images (two with EX) in three steps of 2 per epoch, augmented, and
# one held-out image with EX whose whole-image AUPR is the monitor.
TINY_SEGMENTER = Scenario(
    "idrid",
    8,
    64,
    0,  # IDRiD_01-03 have EX, 04-06 not; 07-08 form the test split
    tuple(
        "segment --lesion EX --model local-global --phases global --base-filters 4 "
        "--global-size 64 --val-names IDRiD_03".split()
    ),
    recipe="[train]\ntensorboard = false\n\n"
    "[local_global]\nglobal_depth = 1\nbase_filters = 4\nmax_filters = 16\n",
    phase="global",
)
VGG16_PRETRAIN = Scenario(
    "kaggle",
    6,
    64,
    3,
    ("pretrain", "--backbone", "vgg16", "--image-size", "32", "--val-fraction", "0.34"),
)


def _environment() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command) -> subprocess.CompletedProcess:
    """Run `command` to completion (bounded by RUN_TIMEOUT) and check it succeeded."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_environment()
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def _state_epoch(out: Path, phase) -> int:
    from rmib.training import RunDirectory

    path = RunDirectory(out, create=False).state_path(phase)
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _start(command, log: Path) -> subprocess.Popen:
    """Start `command` in the background, its output going to `log` (never a pipe that fills)."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=_environment()
        )


def _kill_after_checkpoint(command, out: Path, phase, epoch: int) -> int:
    """Start `command`, SIGKILL it once its state file reports `epoch`; return the epoch seen."""
    log = out.parent / f"{out.name}-killed.log"
    process = _start(command, log)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while _state_epoch(out, phase) < epoch:
            if process.poll() is not None:
                pytest.fail(f"training ended before epoch {epoch}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of epoch {epoch} within {RUN_TIMEOUT} s")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()  # no-op when already dead
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return _state_epoch(out, phase)


def _weights(path: Path) -> list[np.ndarray]:
    from rmib.training import load_model

    return load_model(path).get_weights()


@dataclasses.dataclass(frozen=True)
class Runs:
    scenario: Scenario
    straight: Path  # the uninterrupted run
    killed: Path  # the killed-and-resumed run
    killed_at: int  # the epoch of the last checkpoint before the kill
    at_kill: list  # the weights of that checkpoint, read right after the kill


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(TINY_SEGMENTER, id="segment-local-global"),
        pytest.param(VGG16_PRETRAIN, id="pretrain-vgg16", marks=pytest.mark.slow),
    ],
)
def runs(request, tmp_path_factory) -> Runs:
    """The two runs of a scenario; the uninterrupted one trains in the background
    meanwhile, to halve the wall time."""
    from rmib.data import synthetic
    from rmib.training import RunDirectory

    scenario = request.param
    root = tmp_path_factory.mktemp(scenario.layout)
    data = synthetic.write_dataset(
        root / "data", scenario.layout, scenario.count, scenario.image_size, scenario.data_seed
    )
    straight, killed = root / "straight", root / "killed"
    log = root / "straight.log"
    background = _start(scenario.command(data, straight), log)
    try:
        killed_at = _kill_after_checkpoint(
            scenario.command(data, killed), killed, scenario.phase, KILL_AFTER
        )
        assert KILL_AFTER <= killed_at < EPOCHS, f"killed too late (after epoch {killed_at})"
        assert not (killed / "model.keras").exists()
        # The checkpoint the kill left behind is whole: it loads.
        at_kill = _weights(
            RunDirectory(killed, create=False).checkpoint_path("last", scenario.phase)
        )
        _run(scenario.command(data, killed, "--resume"))
        background.wait(timeout=RUN_TIMEOUT)
        assert background.returncode == 0, log.read_text()
    finally:
        background.kill()
        background.wait(timeout=30)
    return Runs(scenario, straight, killed, killed_at, at_kill)


def test_resumed_run_completes_with_each_epoch_once(runs):
    from rmib.training import RunDirectory, load_model

    phase = runs.scenario.phase
    run = RunDirectory(runs.killed, create=False)
    epochs = [row["epoch"] for row in run.read_history(phase)]
    assert epochs == list(range(1, EPOCHS + 1))
    assert run.read_state(phase)["epoch"] == EPOCHS
    assert load_model(run.checkpoint_path("last", phase)).count_params() > 0
    assert run.model_path.is_file()
    # No temporary file of an interrupted atomic write is left behind.
    assert not [p.name for p in runs.killed.rglob(".*") if p.suffix in (".tmp", ".keras")]


def test_resumed_run_equals_an_uninterrupted_one(runs):
    from rmib.training import RunDirectory

    phase = runs.scenario.phase
    killed, straight = (
        RunDirectory(runs.killed, create=False),
        RunDirectory(runs.straight, create=False),
    )
    pairs = [(killed.checkpoint_path("last", phase), straight.checkpoint_path("last", phase))]
    pairs.append((killed.model_path, straight.model_path))
    for resumed_path, straight_path in pairs:
        resumed, uninterrupted = _weights(resumed_path), _weights(straight_path)
        assert len(resumed) == len(uninterrupted)
        for a, b in zip(resumed, uninterrupted, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=resumed_path.name)


def test_resume_trained_on_from_the_killed_checkpoint(runs):
    from rmib.training import RunDirectory

    last = RunDirectory(runs.killed, create=False).checkpoint_path("last", runs.scenario.phase)
    final = _weights(last)
    assert len(final) == len(runs.at_kill)
    assert any(not np.array_equal(a, b) for a, b in zip(final, runs.at_kill, strict=True))


def test_history_matches_the_uninterrupted_run(runs):
    from rmib.training import RunDirectory

    phase = runs.scenario.phase
    resumed = RunDirectory(runs.killed, create=False).read_history(phase)
    straight = RunDirectory(runs.straight, create=False).read_history(phase)
    assert len(resumed) == len(straight) == EPOCHS
    for a, b in zip(resumed, straight, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)


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
