"""benchmarks/multiworker.py: the rows, the Markdown section and a failing child.

The benchmark itself (three TensorFlow processes) runs in
`python -m benchmarks.run --quick --only multiworker_throughput`; here its
arithmetic and rendering are checked on hand-made child results.
"""

from __future__ import annotations

import time
import types

import pytest

from benchmarks import multiworker, run
from rmib.training import local_cluster

pytestmark = pytest.mark.timeout(120)

JOB = {**multiworker.QUICK_JOB, "warmup_steps": 2, "timed_steps": 3}
MACHINE = {
    "date": "2026-01-01 00:00 UTC",
    "cpu": "Test CPU",
    "cores": 2,
    "tensorflow": "2.x",
    "keras": "3.x",
    "load": (1.0, 1.0, 1.0),
}


def child(steps, chief=True, replicas=1, global_batch=4, fit=3.0):
    return {
        "replicas": replicas,
        "chief": chief,
        "global_batch": global_batch,
        "per_replica_batch": global_batch // replicas,
        "step_seconds": steps,
        "iterations": len(steps),
        "fit_seconds": fit,
        "params": 1234,
        "trainable_params": 1000,
        "loss": 0.69,
    }


def test_row_excludes_warmup_and_uses_the_chiefs_steps():
    # Warm-up steps (9.0, 8.0) are excluded; the chief's timed steps 0.2, 0.5, 0.4 -> median 0.4.
    workers = [
        child([9.0, 8.0, 0.2, 0.5, 0.4], chief=True, replicas=2, fit=5.0),
        child([9.0, 8.0, 0.3, 0.3, 0.3], chief=False, replicas=2, fit=6.0),
    ]
    row = multiworker._row("multi", workers, 20.0, "1.0/1.0/1.0", JOB)
    assert row["step_seconds"] == pytest.approx(0.4)
    assert row["step_spread"] == (0.2, 0.5)
    assert row["images_per_second"] == pytest.approx(4 / 0.4)
    assert row["worker_step_seconds"] == pytest.approx([0.4, 0.3])
    assert row["fit_seconds"] == 6.0  # the slower worker
    assert (row["processes"], row["replicas"], row["per_replica_batch"]) == (2, 2, 2)


def test_row_refuses_a_run_with_missing_steps():
    with pytest.raises(RuntimeError, match="expected 5"):
        multiworker._row("single", [child([0.1, 0.1, 0.1])], 1.0, "", JOB)


def test_full_and_quick_jobs_split_the_global_batch_evenly():
    for quick in (False, True):
        settings = run.Settings.quick_settings() if quick else run.Settings()
        job = multiworker.job_for(settings)
        assert job["global_batch"] % multiworker.WORKERS == 0
        assert job["warmup_steps"] >= 1 and job["timed_steps"] >= 1


def test_render_states_both_runs_the_ratio_and_what_it_means():
    single = multiworker._row("single", [child([5.0, 5.0, 0.5, 0.5, 0.5])], 10.0, "2/2/2", JOB)
    multi = multiworker._row(
        "multi",
        [child([5, 5, 1.0, 1.0, 1.0], True, 2), child([5, 5, 1.0, 1.0, 1.0], False, 2)],
        25.0,
        "3/3/3",
        JOB,
    )
    for row in (single, multi):
        row["gflops"] = row["peak_percent"] = None
    result = {
        "settings": {**JOB, "workers": 2},
        "model": {"label": "test model", "params": 1234, "gradient_mb": 0.004},
        "rows": [single, multi],
        "ratio": multi["images_per_second"] / single["images_per_second"],
        "overhead_seconds": 0.5,
        "pending": [],
        "peak_used": {"float32": 10.0, "bfloat16": 5.0},
    }
    text = multiworker.render_multiworker(result, MACHINE, run.Settings.quick_settings())
    assert text.startswith("## multiworker_throughput")
    assert "**global batch of 4 images**" in text
    # images/s: 4 / 0.5 = 8 for one process, 4 / 1.0 = 4 for two workers: ratio 0.50.
    assert "| 1 x 1 | 4 | 4 | 8.000 | 0.500 |" in text
    assert "| 2 x 1 | 4 | 2 | 4.000 | 1.000 |" in text
    assert "**Two workers / one process: 0.50x the images/s**" in text
    assert "process wall 2.50x" in text
    assert "not a speed-up" in text and "share the same cores" in text
    assert "QUICK" in text


def test_a_failing_child_is_an_error_with_its_log_and_stops_the_others(tmp_path, monkeypatch):
    # Worker 1 fails at once (unknown strategy); worker 0 would wait for it forever.
    strategies = ("multiworker", "no_such_strategy")
    cluster = zip(local_cluster.local_cluster(2), strategies, strict=True)
    run_dir = str(tmp_path / "run")
    jobs = [({**JOB, "strategy": strategy, "run_dir": run_dir}, tf) for tf, strategy in cluster]
    # A clock that never moves: the timeout can never fire, so the only way out of the
    # wait (before pytest-timeout fails the test) is noticing worker 1's exit while
    # worker 0 still waits for its peer.
    sleeps = []
    clock = types.SimpleNamespace(
        perf_counter=lambda: 0.0, sleep=lambda s: sleeps.append(s) or time.sleep(s)
    )
    monkeypatch.setattr(local_cluster, "time", clock)
    with pytest.raises(RuntimeError, match="no_such_strategy") as error:
        multiworker.run_processes(jobs, tmp_path, timeout=90)
    assert "worker process failed (exit 1)" in str(error.value)
    assert "still running" not in str(error.value)
    assert sleeps  # it did poll while worker 0 was running
