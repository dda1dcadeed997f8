"""A multi-worker cluster on this machine: rehearse `--strategy multiworker` before going wide.

`local_cluster(n)` describes n workers on free ports of 127.0.0.1 (one
TF_CONFIG per worker); `worker_environment` is the environment of one worker
process (CPU only, TensorFlow's log quiet); `run_workers` starts the workers
at once and waits for all of them, stopping the others as soon as one fails
(a lone worker would wait for its peers forever). The multi-worker tests and
`benchmarks/multiworker.py` run their clusters through these.

    commands = [["rmib", "pretrain", "--strategy", "multiworker", ...]] * 2
    environments = [worker_environment(c) for c in local_cluster(2)]
    run_workers(commands, environments, logs=[Path("w0.log"), Path("w1.log")], timeout=600)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (released again for the workers)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(workers: int) -> list[dict]:
    """The TF_CONFIG of each of `workers` workers on 127.0.0.1 (worker 0 is the chief).

    Raises:
        ValueError: fewer than one worker.
    """
    if workers < 1:
        raise ValueError(f"a cluster needs at least one worker, got {workers}")
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    return [
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        for index in range(workers)
    ]


def worker_environment(tf_config: dict | None = None, **extra: str) -> dict:
    """This process's environment for a child: CPU only, quiet, with `tf_config` as TF_CONFIG.

    Without `tf_config` the child gets no TF_CONFIG (a single process), even if
    this process has one. `extra` adds or replaces variables.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_workers(
    commands: Sequence[Sequence[str]],
    environments: Sequence[dict],
    logs: Sequence[Path],
    timeout: float,
    *,
    cwd=None,
    poll: float = 0.2,
) -> float:
    """Start one process per command at once (stdout and stderr to its log); wait for all.

    Args:
        commands: each process's command line.
        environments: each process's environment (`worker_environment`).
        logs: each process's log file (written).
        timeout: seconds from the first launch until every process must have exited.
        cwd: working directory of the processes.
        poll: seconds between two looks at the processes.

    Returns:
        The wall time in seconds from the first launch until the last process exited.

    Raises:
        RuntimeError: a process failed (its exit code and the end of its log), or
            they ran out of time; the processes still running are killed.
        ValueError: commands, environments and logs differ in number.
    """
    if not len(commands) == len(environments) == len(logs):
        raise ValueError(
            f"one environment and one log per command: got {len(commands)} commands, "
            f"{len(environments)} environments, {len(logs)} logs"
        )
    processes = []
    start = time.perf_counter()
    try:
        for command, env, log in zip(commands, environments, logs, strict=True):
            with open(log, "wb") as handle:
                process = subprocess.Popen(
                    list(command), cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT
                )
            processes.append((process, log))
        # poll() every process each round (any() would stop at the first running one).
        while None in [p.poll() for p, _ in processes]:
            failed = [(p, log) for p, log in processes if p.returncode not in (None, 0)]
            if failed:
                raise RuntimeError(_failure(failed))
            if time.perf_counter() - start > timeout:
                tails = "\n".join(log_tail(log) for _, log in processes)
                raise RuntimeError(f"worker processes still running after {timeout} s:\n{tails}")
            time.sleep(poll)
        seconds = time.perf_counter() - start
        failed = [(p, log) for p, log in processes if p.returncode != 0]
        if failed:
            raise RuntimeError(_failure(failed))
        return seconds
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def _failure(failed) -> str:
    return "\n".join(
        f"worker process failed (exit {process.returncode}):\n{log_tail(log)}"
        for process, log in failed
    )
