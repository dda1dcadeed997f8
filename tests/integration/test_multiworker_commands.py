"""A real training command under MultiWorkerMirroredStrategy: two `rmib segment` workers.

tests/integration/test_multiworker.py checks the runner's distributed loop on a tiny
dense model; here the whole command runs in two worker processes on
127.0.0.1 (CPU, free ports picked at run time), each with its own TF_CONFIG
and the same `--out`: the GlobalNet of the local-global U-Net (4 filters,
one pooling level), with its tf.data pipeline, poly learning-rate schedule,
whole-image validation callback, phase files and final model. The chief
writes the run; worker 1 writes under `workers/worker_1/`; both end with the
same trained weights, batch-norm statistics (averaged over the workers at
every epoch end), training loss and whole-image validation values.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)

WORKER_TIMEOUT = 300  # seconds for both workers
EPOCHS = 2
RECIPE = """\
[train]
tensorboard = false

[local_global]
global_depth = 1
base_filters = 4
max_filters = 16
"""


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> Path:
    """The run directory both workers trained into."""
    from rmib.data import synthetic
    from rmib.training.local_cluster import local_cluster, run_workers, worker_environment

    tmp = tmp_path_factory.mktemp("multiworker-segment")
    # IDRiD_01-03 have EX, 04-06 not; 07-08 form the test split.
    data = synthetic.write_dataset(tmp / "data", "idrid", 8, 64, seed=0)
    recipe = tmp / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp / "run"
    command = [
        sys.executable, "-m", "rmib", "segment", "--config", str(recipe), "--data", str(data),
        "--lesion", "EX", "--model", "local-global", "--phases", "global", "--base-filters", "4",
        "--global-size", "64", "--val-names", "IDRiD_03", "--epochs", str(EPOCHS),
        "--batch-size", "1", "--precision", "float32", "--seed", "0",
        "--strategy", "multiworker", "--out", str(out),
    ]  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    environments = [worker_environment(c, OMP_NUM_THREADS=threads) for c in local_cluster(2)]
    logs = [tmp / f"worker{index}.log" for index in range(2)]
    run_workers([command] * 2, environments, logs, WORKER_TIMEOUT)
    return out


def _model(path: Path):
    from rmib.training import load_model

    return load_model(path)


def test_the_chief_writes_the_run_and_worker_1_apart(cluster_run):
    from rmib.training import RunDirectory

    chief = RunDirectory(cluster_run, create=False)
    worker = RunDirectory(cluster_run / "workers" / "worker_1", create=False)
    assert sorted(p.name for p in (cluster_run / "workers").iterdir()) == ["worker_1"]
    for run in (chief, worker):
        assert run.model_path.is_file()
        assert run.checkpoint_path("last", "global").is_file()
        assert [row["epoch"] for row in run.read_history("global")] == list(range(1, EPOCHS + 1))
    assert chief.read_metadata()["model"] == "local-global"
    assert chief.config_path.is_file() and "validation" in chief.read_metrics()
    assert "validation" not in worker.read_metrics()


def test_workers_end_with_the_same_trained_weights_and_history(cluster_run):
    from rmib.training import RunDirectory

    chief = _model(cluster_run / "model.keras")
    worker = _model(cluster_run / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(worker.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, worker.trainable_weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The training loss is reduced over the workers: the same on both; so is the
    # whole-image validation, which each worker runs on its own copy of the model.
    rows = [
        RunDirectory(path, create=False).read_history("global")
        for path in (cluster_run, cluster_run / "workers" / "worker_1")
    ]
    for a, b in zip(*rows, strict=True):
        for key in ("epoch", "loss", "learning_rate", "val_aupr", "val_f1"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    # Training did something: the first epoch's loss is not the last's.
    assert rows[0][0]["loss"] != rows[0][-1]["loss"]


def test_workers_end_with_the_same_batch_norm_statistics(cluster_run):
    chief = _model(cluster_run / "model.keras")
    worker = _model(cluster_run / "workers" / "worker_1" / "model.keras")
    moving = [w for w in chief.non_trainable_weights if "moving" in w.path]
    assert moving  # the U-Net has BatchNormalization layers
    for a, b in zip(chief.non_trainable_weights, worker.non_trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.path)


def test_only_the_chief_writes_the_commands_own_files(tmp_path, monkeypatch):
    """`rmib segment` writes config.toml and metrics.json in --out on the chief alone."""
    from rmib import tasks, training
    from rmib.methods.segment_config import SegmentConfig

    monkeypatch.setattr(tasks, "lesion_records", lambda *args: ["a", "b"])
    monkeypatch.setattr(tasks, "split_records", lambda records, cfg: (records, []))
    method = dataclasses.replace(
        tasks.SEGMENT_METHODS["encoder-decoder"], train=lambda *args, **kwargs: {"aupr": 0.5}
    )
    monkeypatch.setitem(tasks.SEGMENT_METHODS, "encoder-decoder", method)
    for chief in (False, True):
        out = tmp_path / f"chief_{chief}"
        monkeypatch.setattr(training, "is_chief", lambda strategy, chief=chief: chief)
        cfg = SegmentConfig(data=[str(tmp_path)], lesion="EX", out=str(out))
        assert tasks.run_segment(cfg, echo=lambda *a: None) == {"aupr": 0.5}
        written = sorted(p.name for p in out.iterdir() if p.is_file())
        assert written == (["config.toml", "metrics.json"] if chief else [])
