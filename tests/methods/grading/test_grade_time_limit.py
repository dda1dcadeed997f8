"""`rmib grade train --time-limit` is the whole run's limit, as for every other method.

On a fake clock (every epoch costs exactly 60 s; no wall-clock assertion), with
a limit of 2.5 minutes: the local net's one epoch (60 s) and the global net's
first (120 s in all, and another would not fit) end the run in phase "global";
the baseline waits. A limit per phase, as before, would have trained the global
net and the baseline two epochs each. A resume with the same limit trains
nothing; one with a longer limit continues the global net and trains the baseline.
A stop in the first phase (the local net) says so, with its epochs and how to
resume, and does not claim a grader.
"""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from rmib.cli import cli
from rmib.config import read_toml
from rmib.data import synthetic
from rmib.methods.grading.config import GradeConfig

pytestmark = pytest.mark.timeout(600)

FLAGS = [
    "--image-size", 96, "--patch-size", 16, "--overlap", 8, "--global-size", 32,
    "--local-epochs", 1, "--epochs", 3, "--batch-size", 4, "--local-batch-size", 64,
    "--precision", "float32", "--early-stopping", 5, "--strategy", "default",
]  # fmt: skip


def train(data, run, minutes, *more):
    recipe = run.parent / "tiny.toml"
    recipe.write_text("[local_train]\ntensorboard = false\n\n[train]\ntensorboard = false\n")
    args = ["grade", "train", "--data", data, "--out", run, "--config", recipe, *FLAGS]
    result = CliRunner().invoke(cli, [*map(str, args), "--time-limit", str(minutes), *more])
    assert result.exit_code == 0, result.output
    return result.output


def epochs(run, phase):
    path = run / f"history_{phase}.csv"
    return [int(row["epoch"]) for row in csv.DictReader(path.open())] if path.is_file() else []


def test_the_time_limit_is_the_whole_runs_and_a_longer_one_resumes(tmp_path, fake_clock, eager):
    data = synthetic.write_dataset(tmp_path / "idrid", "idrid", count=10, size=96, seed=0)
    run = tmp_path / "run"
    output = train(data, run, 2.5)
    assert (epochs(run, "local"), epochs(run, "global"), epochs(run, "global_plain")) == (
        [1],
        [1],
        [],
    )
    assert "the time limit of 2.5 min ended the run in phase global" in output
    assert (run / "local_net.keras").is_file() and (run / "global_net.keras").is_file()
    assert not (run / "global_net_plain.keras").exists()
    config = read_toml(run / "config.toml")
    for section in ("local_train", "train"):
        assert config[section]["time_limit"] == 2.5
        assert config[section]["early_stopping_patience"] == 5
        assert config[section]["strategy"] == "default"

    # The same limit: the run ends where it ended, nothing is trained.
    before = (run / "history_global.csv").read_text()
    output = train(data, run, 2.5, "--resume")
    assert "phase local: local_net.keras exists, done" in output
    assert "phase global: global_net.keras exists, done" in output
    assert "ended the run in phase global" in output
    assert (run / "history_global.csv").read_text() == before
    assert epochs(run, "global_plain") == []

    # A longer limit: the global net goes on from epoch 1, then the baseline trains.
    output = train(data, run, 30, "--resume")
    assert "phase local: local_net.keras exists, done" in output
    assert (epochs(run, "local"), epochs(run, "global"), epochs(run, "global_plain")) == (
        [1],
        [1, 2, 3],
        [1, 2, 3],
    )
    assert (run / "global_net_plain.keras").is_file()


def test_a_stop_in_the_local_phase_says_so_and_a_longer_limit_resumes(tmp_path, fake_clock, eager):
    # Three local epochs of 60 s do not fit in 1.5 minutes: the run ends in phase "local"
    # after its first, with a local net but no grader (no global net, no model.keras).
    data = synthetic.write_dataset(tmp_path / "idrid", "idrid", count=10, size=96, seed=0)
    run = tmp_path / "run"
    flags = ["--local-epochs", "3", "--epochs", "1", "--no-baseline"]
    stop = (
        "the time limit of 1.5 min ended the run in phase local after 1 epoch; "
        "local_net.keras holds the local net so far, and there is no grader until phase "
        "global has trained (continue with --resume and a longer --time-limit)"
    )
    output = train(data, run, 1.5, *flags)
    assert stop in output and "the run's model" not in output
    assert (epochs(run, "local"), epochs(run, "global")) == ([1], [])
    assert (run / "local_net.keras").is_file()
    assert not (run / "global_net.keras").exists() and not (run / "model.keras").exists()

    # The same limit: the local net is loaded, not trained, and the run ends as before.
    output = train(data, run, 1.5, *flags, "--resume")
    assert "phase local: local_net.keras exists, done" in output and stop in output
    assert (epochs(run, "local"), epochs(run, "global")) == ([1], [])

    # A longer limit: the local net goes on from epoch 1, then the global net trains.
    output = train(data, run, 30, *flags, "--resume")
    assert "ended the run" not in output
    assert (epochs(run, "local"), epochs(run, "global")) == ([1, 2, 3], [1])
    assert (run / "global_net.keras").is_file()


def test_a_separate_local_time_limit_is_refused():
    from rmib.config import TrainConfig
    from rmib.errors import RmibError

    GradeConfig(local_train=TrainConfig(time_limit=0.0), train=TrainConfig(time_limit=5.0))
    GradeConfig(local_train=TrainConfig(time_limit=5.0), train=TrainConfig(time_limit=5.0))
    with pytest.raises(RmibError, match="the time limit is the whole run's; set it in"):
        GradeConfig(local_train=TrainConfig(time_limit=2.0), train=TrainConfig(time_limit=5.0))
