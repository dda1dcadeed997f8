"""Logs a person can read: a line per epoch off a terminal, history.png, TensorFlow quiet.

Issue 16, deliverable 5.
"""

from __future__ import annotations

import hashlib
import io as _io
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from rmib import console, io
from rmib.report import history_panels, save_history_plot
from rmib.training import RunDirectory, fit
from rmib.training.callbacks import epoch_line
from tests.conftest import PROJECT_ROOT
from tests.training.test_training import arrays, config, tiny_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _verbosity_by_the_terminal():
    console.set_training_verbosity(None)
    yield
    console.set_training_verbosity(None)


class _Stream(_io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_verbosity_follows_the_terminal_unless_told(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    assert console.training_verbosity() == 1  # Keras' bar on a terminal
    monkeypatch.setattr(sys, "stdout", _Stream(tty=False))
    assert console.training_verbosity() == 2  # a line per epoch in a file or pipe
    console.set_training_verbosity(0)  # --verbose 0
    assert console.training_verbosity() == 0
    assert console.training_verbosity(1) == 1  # an explicit argument wins
    with pytest.raises(ValueError, match="0, 1 or 2, got 3"):
        console.set_training_verbosity(3)


def test_epoch_line_has_the_finite_values_of_the_epoch():
    logs = {"loss": 0.51234, "val_aupr": float("nan"), "accuracy": np.float32(0.25)}
    assert epoch_line(3, 10, logs, 12.34, "local") == (
        "epoch 3/10 (phase local) 12.3 s: loss 0.5123, accuracy 0.25"
    )
    assert epoch_line(1, 1, {}, 0.0) == "epoch 1/1 0.0 s: "


def test_off_a_terminal_training_prints_one_line_per_epoch(tmp_path, monkeypatch):
    stream = _Stream(tty=False)
    monkeypatch.setattr(sys, "stdout", stream)
    fit(
        tiny_model,
        arrays(0),
        arrays(1, 16),
        config=config(epochs=3),
        run_dir=tmp_path / "run",
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no progress bar in a log file
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split(" s:")[0].rsplit(" ", 1)[0] for line in lines] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    rows = RunDirectory(tmp_path / "run").read_history()
    for line, row in zip(lines, rows, strict=True):
        assert f"val_loss {row['val_loss']:.4g}" in line and f"loss {row['loss']:.4g}" in line
    assert len(text.splitlines()) == 3 + 1  # the epochs and the precision line


def test_history_panels_are_the_loss_and_each_validation_value():
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "val_aupr"]
    assert history_panels(columns) == [
        ("loss", ["loss", "val_loss"]),
        ("val_accuracy", ["val_accuracy", "accuracy"]),
        ("val_aupr", ["val_aupr"]),
    ]
    assert history_panels(["epoch", "loss", "learning_rate"]) == [("loss", ["loss"])]
    assert history_panels([]) == []


class _PlotRecorder(keras.callbacks.Callback):
    """The sha256 of history.png as each epoch ends (rmib's checkpoint ran before)."""

    def __init__(self, path):
        super().__init__()
        self.path, self.digests = path, []

    def on_epoch_end(self, epoch, logs=None):
        self.digests.append(hashlib.sha256(self.path.read_bytes()).hexdigest())


def test_history_png_is_redrawn_every_epoch_atomically(tmp_path):
    run = RunDirectory(tmp_path / "run")
    recorder = _PlotRecorder(run.history_plot_path)
    fit(
        tiny_model,
        arrays(0),
        arrays(1, 16),
        config=config(epochs=2),
        run_dir=run,
        loss="binary_crossentropy",
        metrics=["accuracy"],
        extra_callbacks=[recorder],
        verbose=0,
    )
    assert len(recorder.digests) == 2 and recorder.digests[0] != recorder.digests[1]
    picture = io.read_image(run.history_plot_path)
    # Two panels (loss; val_accuracy) of 5 x 3 inches at 80 dpi.
    assert picture.shape == (2 * 3 * 80, 5 * 80, 3)
    assert not [p for p in run.path.rglob("*") if io.is_atomic_temporary(p.name)]


def test_history_png_of_a_phased_run_draws_every_phase(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.write_history([{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.7}], "global")
    one_phase = run.history_plot_path.read_bytes()
    run.write_history([{"epoch": 1, "loss": 0.5, "val_loss": 0.6, "val_f1": math.nan}], "local")
    assert run.history_plot_path.read_bytes() != one_phase
    assert io.read_image(run.history_plot_path).shape == (3 * 80, 5 * 80, 3)  # one panel
    assert save_history_plot({None: []}, tmp_path / "empty.png") is None


# --------------------------------------------------------------------------- TensorFlow's log

# What TensorFlow 2.21 writes to stderr when it starts on a CPU-only machine.
START_UP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796556292.562753   30929 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results.",
    "I0000 00:00:1796556292.563154   30929 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796556559.775082    5381 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796556296.837224   30929 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]


def test_start_up_lines_are_filtered_and_other_lines_kept():
    other = [
        "E0000 00:00:1796556296.837224   30929 op_kernel.cc:1] Out of memory allocating tensor",
        "  while allocating the weights of conv1",  # continues the line kept before it
    ]
    kept, dropped = console.split_start_up_lines(START_UP + other)
    assert dropped == START_UP and kept == other
    kept, dropped = console.split_start_up_lines([other[1], *START_UP[:2]])
    assert kept == [other[1]] and dropped == START_UP[:2]


def test_a_command_prints_no_tensorflow_start_up_lines(tmp_path):
    """`rmib predict` of a folder that holds no run: one line on stderr, the error.

    Run as a new process (the tests' own TensorFlow has started already), with
    TF_CPP_MIN_LOG_LEVEL unset as a user's shell has it.
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    (tmp_path / "photo.jpg").write_bytes(b"not read")
    args = [sys.executable, "-m", "rmib", "predict", tmp_path, tmp_path / "photo.jpg"]
    args += ["--out", tmp_path / "out"]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=200)
    assert quiet.returncode == 1
    assert quiet.stderr.splitlines() == [
        f"Error: {tmp_path}: not an rmib run directory (it has no rmib.json or model.keras)"
    ]
    loud = subprocess.run([*args, "--tf-log"], env=env, capture_output=True, text=True, timeout=200)
    assert loud.returncode == 1 and loud.stderr.splitlines()[-1] == quiet.stderr.strip()
    assert not (tmp_path / "out").exists()
