"""idrid_real's runner: each row in a child process, then `rmib evaluate`; the entry
`idrid_real` of `benchmarks.run`."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROJECT_ROOT
from benchmarks.idrid_real.results import (
    RESULTS,
    add_row,
    load_results,
    pending_rows,
    results_path,
)
from benchmarks.idrid_real.rows import (
    FINAL_LEVERS,
    FINAL_MINUTES,
    KIND_NAMES,
    LEVERS,
    QUICK_ROWS,
    ROWS,
    STAGE1_KINDS,
    evaluate_command,
    row_command,
    run_name,
)
from benchmarks.idrid_real.split import IDRID, IDRID_SAMPLE, build_stage1_view, split_names

REGION_SIGMA = "0.5"
TIMEOUT = 4 * 3600


def _context(quick: bool, minutes: float, workdir: Path, taskset) -> dict:
    """What `row_command` and `run_row` read: the data, the split, the work directory."""
    data = IDRID_SAMPLE if quick else IDRID
    names = [
        p.stem for p in (data / "A. Segmentation/1. Original Images/a. Training Set").glob("*.jpg")
    ]
    return {
        "quick": quick,
        "minutes": minutes,
        "workdir": workdir,
        "data": data,
        "val_names": split_names(names)[1],
        "taskset": taskset,
        "stage1_data": workdir / "stage1_data",
        "lever": None,
    }


def _pin(command: list[str], taskset) -> list[str]:
    return command if taskset is None else ["taskset", "-c", str(taskset), *command]


def _run(command: list[str], log: Path) -> float:
    """Run `command` (rmib through this Python), its output to `log`; its wall seconds."""
    argv = list(command)
    if "rmib" in argv:
        at = argv.index("rmib")
        argv[at : at + 1] = [sys.executable, "-m", "rmib"]
    elif "python" in argv:
        argv[argv.index("python")] = sys.executable
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=TIMEOUT, cwd=PROJECT_ROOT
        ).returncode
    seconds = time.monotonic() - start
    if code:
        raise RuntimeError(f"{shlex.join(command[:4])} ... failed ({code}); log {log}:\n"
                           + log.read_text()[-3000:])  # fmt: skip
    return seconds


def _stage1_metrics(run: Path) -> dict:
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    return {k: validation[k] for k in ("roc_auc", "accuracy", "recall", "precision", "n")}


def _training_summary(run: Path) -> dict:
    """Epochs trained and the epoch whose weights were kept, from the run's metrics.json."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    training = metrics.get("training") or {}
    return {k: training[k] for k in ("epochs_trained", "best_epoch", "weights") if k in training}


def _run_id(run: Path) -> str:
    """The run's directory name and start (rmib.json modification time)."""
    stamp = datetime.datetime.fromtimestamp(
        (run / "rmib.json").stat().st_mtime, datetime.timezone.utc
    )
    return f"{run.name}@{stamp:%Y-%m-%dT%H:%MZ}"


def run_row(key: str, ctx: dict, cpu: str, echo=print) -> dict:
    """Train row `key`, score it, return its JSON record."""
    lesion, kind, seed = ROWS[key]
    workdir = ctx["workdir"]
    name = run_name(key, ctx)
    record = {
        "kind": KIND_NAMES[kind],
        "lesion": lesion,
        "seed": seed,
        "minutes": ctx["minutes"],
        "cpu": cpu,
        "pinned": f"taskset -c {ctx['taskset']}" if ctx["taskset"] is not None else "run alone",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if ctx.get("lever"):
        record["lever"] = {"name": ctx["lever"], "description": LEVERS[ctx["lever"]][0],
                           "overrides": LEVERS[ctx["lever"]][1]}  # fmt: skip
    stage1_key = key if kind in STAGE1_KINDS else "stage1"
    if kind in STAGE1_KINDS or (kind == "a" and not (workdir / "stage1" / "model.keras").exists()):
        view = build_stage1_view(IDRID, ctx["stage1_data"])
        # A segmentation row's lever is not stage 1's: the model it needs is `stage1`.
        stage1_ctx = ctx if kind in STAGE1_KINDS else {**ctx, "lever": None}
        command = _pin(row_command(stage1_key, stage1_ctx), ctx["taskset"])
        echo(f"idrid_real {stage1_key}: {shlex.join(command)}")
        seconds = _run(command, workdir / "logs" / f"{stage1_key}.log")
        run = workdir / run_name(stage1_key, stage1_ctx)
        stage1 = {"run": _run_id(run), **_stage1_metrics(run)}
        if kind in STAGE1_KINDS:
            view["excluded"] = len(view["excluded"])
            return {**record, "command": shlex.join(command), "train_seconds": seconds,
                    "data": view, **stage1}  # fmt: skip
        record["stage1_retrained"] = stage1
    if kind == "a":
        record["stage1_run"] = _run_id(workdir / "stage1")
    command = _pin(row_command(key, ctx), ctx["taskset"])
    echo(f"idrid_real {name}: {shlex.join(command)}")
    record["command"] = shlex.join(command)
    record["train_seconds"] = _run(command, workdir / "logs" / f"{name}.log")
    record.update(_training_summary(workdir / name))
    evaluate = _pin(evaluate_command(key, ctx), ctx["taskset"])
    record["evaluate_command"] = shlex.join(evaluate)
    seconds = _run(evaluate, workdir / "logs" / f"{name}_evaluate.log")
    scores = json.loads((workdir / name / "evaluation" / "metrics.json").read_text())
    record.update(
        images=scores["images"],
        ap=scores["aupr"],
        f1=scores["f1"],
        threshold=scores["threshold"],
        region_f=scores["region_f_score"][REGION_SIGMA],
        seconds_per_photograph=seconds / max(1, scores["images"]),
    )
    return record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown CPU"


def _workdir(quick: bool) -> Path:
    value = os.environ.get("RMIB_BENCH_WORKDIR")
    if not value:
        if quick:
            return Path(tempfile.mkdtemp(prefix="rmib-idrid-real-quick-"))
        raise SystemExit("idrid_real: set RMIB_BENCH_WORKDIR to a folder outside the repository")
    path = Path(value).resolve()
    if path == PROJECT_ROOT or PROJECT_ROOT in path.parents:
        raise SystemExit(f"RMIB_BENCH_WORKDIR={path} is inside the repository; use one outside")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_lever(lever, minutes: float, quick: bool):
    """`lever` if it may run at `minutes`: 30-minute rows take only `FINAL_LEVERS`."""
    if lever is None:
        return None
    if lever not in LEVERS:
        raise SystemExit(f"unknown lever {lever!r}; valid: {', '.join(LEVERS)}")
    if minutes == FINAL_MINUTES and not quick and lever not in FINAL_LEVERS:
        raise SystemExit(
            f"--lever {lever} is for screening rows: give --minutes (e.g. 10); 30-minute "
            f"rows take only {', '.join(FINAL_LEVERS)} (the recipe unchanged)"
        )
    return lever


def idrid_real(settings, peak, progress=None) -> dict:
    """The benchmark entry of `benchmarks.run`: train and score the pending rows."""
    quick = settings.quick
    minutes = 1.0 if quick else settings.idrid_minutes
    data = IDRID_SAMPLE if quick else IDRID
    if not data.is_dir():
        raise SystemExit(f"idrid_real needs {data}")
    workdir = _workdir(quick)
    ctx = _context(quick, minutes, workdir, settings.taskset)
    ctx["lever"] = check_lever(getattr(settings, "idrid_lever", None), minutes, quick)
    path = results_path(quick, minutes, workdir)
    results = load_results(path)
    results.update(results_file=str(path.relative_to(PROJECT_ROOT) if path == RESULTS else path))
    results.update(minutes=minutes, val_names=list(ctx["val_names"]), workdir=str(workdir))
    wanted = settings.idrid_rows or (QUICK_ROWS if quick else tuple(ROWS))
    cpu = _cpu_model()
    for key in pending_rows(results, wanted, ctx["lever"]):
        name = run_name(key, ctx)
        record = run_row(key, ctx, cpu)
        # Merged under a lock: a row pinned to the other core may finish at the same time.
        add_row(path, results, name, record)
        print(f"idrid_real {name}: {json.dumps(record, default=str)}", flush=True)
        if progress is not None:
            progress(results)
    return results
