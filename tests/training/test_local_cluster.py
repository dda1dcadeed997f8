"""`rmib.training.local_cluster`: TF_CONFIGs of a cluster on 127.0.0.1 and its processes.

The processes here are tiny Python one-liners (no TensorFlow); the clusters that
train live in tests/integration/test_multiworker*.py.
"""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

from rmib.training import local_cluster

pytestmark = pytest.mark.timeout(120)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_local_cluster_lists_every_worker_in_the_same_order():
    configs = local_cluster.local_cluster(3)
    addresses = configs[0]["cluster"]["worker"]
    assert len(addresses) == len(set(addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert [c["cluster"]["worker"] for c in configs] == [addresses] * 3
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    with pytest.raises(ValueError, match="at least one worker, got 0"):
        local_cluster.local_cluster(0)


def test_worker_environment_sets_or_drops_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "inherited")
    config = local_cluster.local_cluster(1)[0]
    env = local_cluster.worker_environment(config, OMP_NUM_THREADS="1")
    assert json.loads(env["TF_CONFIG"]) == config
    assert (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]) == ("", "1")
    assert "TF_CONFIG" not in local_cluster.worker_environment()


def test_run_workers_waits_for_every_process_and_logs_their_output(tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    commands = [python("print('worker a')"), python("import sys; print('worker b', sys.argv)")]
    environments = [local_cluster.worker_environment()] * 2
    seconds = local_cluster.run_workers(commands, environments, logs, timeout=60)
    assert seconds >= 0
    assert logs[0].read_text() == "worker a\n"
    assert logs[1].read_text().startswith("worker b")


def test_a_failing_worker_stops_the_others_with_its_log(tmp_path, monkeypatch):
    # A clock that never moves: the timeout cannot fire, so the only way out of the
    # wait is noticing the failed process while the other still sleeps.
    monkeypatch.setattr(
        local_cluster, "time", types.SimpleNamespace(perf_counter=lambda: 0.0, sleep=time.sleep)
    )
    marker = tmp_path / "finished"
    commands = [
        python(f"import time, pathlib; time.sleep(60); pathlib.Path({str(marker)!r}).touch()"),
        python("import sys; print('no peer here'); sys.exit(3)"),
    ]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    environments = [local_cluster.worker_environment()] * 2
    with pytest.raises(RuntimeError, match="exit 3") as error:
        local_cluster.run_workers(commands, environments, logs, timeout=1, poll=0.05)
    assert "no peer here" in str(error.value)
    assert not marker.exists()  # the sleeping process was killed, not waited for


def test_workers_out_of_time_are_killed(tmp_path, monkeypatch):
    ticks = iter(range(0, 10_000, 100))  # every look at the clock: 100 s later
    monkeypatch.setattr(
        local_cluster,
        "time",
        types.SimpleNamespace(perf_counter=lambda: next(ticks), sleep=time.sleep),
    )
    commands = [python("import time; print('still going', flush=True); time.sleep(60)")]
    with pytest.raises(RuntimeError, match="still running after 150 s"):
        local_cluster.run_workers(
            commands, [local_cluster.worker_environment()], [tmp_path / "a.log"], timeout=150
        )


def test_commands_environments_and_logs_must_pair_up(tmp_path):
    with pytest.raises(ValueError, match="2 commands, 1 environments, 2 logs"):
        local_cluster.run_workers(
            [python("pass")] * 2, [{}], [tmp_path / "a", tmp_path / "b"], timeout=10
        )
