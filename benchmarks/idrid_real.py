"""`idrid_real`: rmib's segmenters on the official IDRiD training portion (issue #14).

The data and the split are fixed for every row (`../shared/data/idrid/README`):

- segmentation: train on 43 of the 54 photographs, validate on the 11 of
  `VAL_NAMES` (every lesion present in representative amounts);
- stage 1: the 395 graded photographs, lesion = grade > 0, minus the graded
  copies of the 11 validation photographs (`duplicates.csv`), as a folder of
  symbolic links in the work directory (healthy/ + lesion/); its validation a
  stratified 20 % (seed 0); `--weights none` (no ImageNet weights offline).

Every row is ONE command line run in a child process with `--time-limit`
(30 minutes for the final rows, `--minutes 10` to screen), `--precision
float32`; then `rmib evaluate` scores the 11 photographs: AP of every pixel
pooled at full resolution (no `--fov-only`), F1 at the threshold 0.5 (no
recipe sets another yet), region F-score at sigma 0.5, and the seconds per
photograph of that evaluation (model loading and preprocessing included).
Row (e), the plain keras-io-style U-Net reference, is trained by this module
(`python -m benchmarks.idrid_real unet ...`) from rmib's building blocks and
saved as an rmib run, so `rmib evaluate` scores it the same way.

Finished rows go into `benchmarks/idrid_real.json` (30-minute rows only;
screening and quick rows into the work directory) and are skipped on
re-runs; models live in `$RMIB_BENCH_WORKDIR`, outside the repository.

    RMIB_BENCH_WORKDIR=/scratch/rmib python -m benchmarks.run --only idrid_real \\
        --out benchmarks/BENCHMARKS.md [--rows EX_a_seed0,EX_e] [--taskset 1] [--minutes 10]
    python -m benchmarks.run --only idrid_real --quick     # idrid-sample, 1 minute a row

Not part of the default `make bench` run (every row is half an hour).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
IDRID = SHARED_DATA / "idrid"
IDRID_SAMPLE = SHARED_DATA / "idrid-sample"
RESULTS = PROJECT_ROOT / "benchmarks" / "idrid_real.json"
VAL_NAMES = tuple(f"IDRiD_{n:02d}" for n in (3, 8, 13, 18, 23, 28, 33, 38, 43, 48, 53))
GRADING_CSV = Path(
    "B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"
)
GRADING_IMAGES = Path("B. Disease Grading/1. Original Images/a. Training Set")
FINAL_MINUTES = 30.0
THRESHOLD = 0.5
REGION_SIGMA = "0.5"
TIMEOUT = 4 * 3600

# key -> (lesion, kind, seed); kinds: stage1 (CBAM started as rmib does), stage1_woo
# (CBAM started as Woo et al.: `--cbam-init woo`), a transferred frozen encoder (the
# default), b from scratch, c local-global, d Dual2Net, e the plain U-Net reference.
ROWS = {"stage1": (None, "stage1", 0), "stage1_woo": (None, "stage1_woo", 0)}
ROWS.update({f"EX_{k}_seed{s}": ("EX", k, s) for k in "ab" for s in (0, 1)})
ROWS.update({"EX_c": ("EX", "c", 0), "EX_d": ("EX", "d", 0), "EX_e": ("EX", "e", 0)})
ROWS.update({f"{lesion}_{k}": (lesion, k, 0) for lesion in ("HE", "MA", "SE") for k in "abe"})
STAGE1_KINDS = ("stage1", "stage1_woo")
# Dual2Net's row: the paper's 960 x 1440 at output stride 8 needs about 30 GB
# (segment/README.md), so the row trains at a third of each side, stride 8 kept.
DUAL2NET_SIZE = (320, 480)
KIND_NAMES = {
    "stage1": "stage 1: VGG16-CBAM lesion / healthy classifier, from scratch",
    "stage1_woo": "stage 1 as above, CBAM started as Woo et al. (`--cbam-init woo`)",
    "a": "encoder-decoder, transferred frozen stage-1 encoder (the default)",
    "b": "encoder-decoder, VGG16-CBAM from scratch",
    "c": "fused local-global U-Net (Yan et al.)",
    "d": "Dual2Net + DSM Dice",
    "e": "plain 4-level U-Net reference (keras-io style)",
}
QUICK_ROWS = ("stage1", "EX_a_seed0", "EX_e")

# Levers screened on EX (`--lever NAME`, 10-minute rows): each is a set of recipe
# overrides applied to the row's recipe (written as a derived TOML in the work
# directory; "[train]" keys as a nested table), one change at a time against
# "base". Screening rows are stored as "<row>+<lever>".
_HALF = {"scale": 0.5, "patches_per_epoch": 1024, "val_every": 1, "augment": "free"}
# The screening base: at scale 0.5 one whole-image validation of the 11 photographs
# costs about 5 minutes of one core (27 s a photograph) and an epoch of 1024 patches
# 6.5 minutes, so a 10-minute row validated every epoch trains one epoch. The base
# validates once, after the last epoch, with short epochs (256 patches) so the time
# limit ends training within a couple of minutes of it, at a constant learning rate.
_BASE = {
    "scale": 0.5,
    "patches_per_epoch": 256,
    "val_every": 1000,
    "augment": "free",
    "train": {"lr_schedule": "constant"},
}
LEVERS = {
    "scale0.5": ("working resolution 0.5, 1024 patches an epoch, validated every epoch", _HALF),
    "base": ("scale 0.5, 256 patches an epoch, validated after the last, constant rate", _BASE),
    "p256": ("base, 256-px patches, batch 8 (about the pixels of 16 x 160 px)",
             {**_BASE, "patch_size": 256, "train": {"lr_schedule": "constant", "batch_size": 8}}),
    "bcedice": ("base, BCE + Dice loss", {**_BASE, "loss": "bce+dice"}),
    "rot90": ("base, flips and quarter turns only", {**_BASE, "augment": "rot90"}),
    "noclahe": ("base, no CLAHE (raw RGB)", {**_BASE, "preprocessing": "none"}),
    "lr3e-4": ("base, learning rate 3e-4",
               {**_BASE, "train": {"lr_schedule": "constant", "learning_rate": 3e-4}}),
    "pos0.25": ("base, a quarter of the patches centred on a lesion", {**_BASE, "pos_fraction": 0.25}),
    "bf16": ("base, trained in mixed_bfloat16 (a precision row: CPUs with avx512_bf16)",
             {**_BASE, "_cli": ["--precision", "mixed_bfloat16"]}),
}  # fmt: skip

# The reference U-Net of issue #14, exactly: base width 16, batch norm, BCE + Dice,
# 256-px patches at half resolution, half centred on a lesion pixel, quarter turns
# and flips, batch 8, Adam 1e-3.
UNET = {"depth": 4, "base_filters": 16, "patch_size": 256, "scale": 0.5, "batch_size": 8}
UNET_QUICK = {**UNET, "patch_size": 64, "scale": 0.25, "batch_size": 4}


# --------------------------------------------------------------------------- the split


def split_names(names) -> tuple[list[str], list[str]]:
    """(training, validation) photograph names: validation = those of `VAL_NAMES` present."""
    names = sorted(set(names))
    return [n for n in names if n not in VAL_NAMES], [n for n in names if n in VAL_NAMES]


def stage1_exclusions(duplicates_csv: Path, val_names=VAL_NAMES) -> set[str]:
    """Graded photographs that are copies of the segmentation validation photographs.

    Raises:
        ValueError: the file lacks the columns segmentation_photograph, grading_photograph.
    """
    with open(duplicates_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"segmentation_photograph", "grading_photograph"} <= set(rows[0]):
        raise ValueError(
            f"{duplicates_csv}: expected the columns segmentation_photograph, "
            f"grading_photograph; got {', '.join(rows[0])}"
        )
    wanted = set(val_names)
    return {r["grading_photograph"] for r in rows if r["segmentation_photograph"] in wanted}


def build_stage1_view(idrid_root: Path, out: Path, val_names=VAL_NAMES) -> dict:
    """A healthy/ + lesion/ folder of symbolic links to the graded photographs to train on.

    Lesion = DR grade > 0; the graded copies of `val_names` are left out.

    Returns:
        {"healthy": n, "lesion": n, "excluded": sorted names}.
    """
    excluded = stage1_exclusions(idrid_root / "duplicates.csv", val_names)
    counts = {"healthy": 0, "lesion": 0}
    for label in counts:
        (out / label).mkdir(parents=True, exist_ok=True)
    with open(idrid_root / GRADING_CSV, newline="") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("Image name") or "").strip()
            if not name or name in excluded:
                continue
            label = "lesion" if int(row["Retinopathy grade"]) > 0 else "healthy"
            link = out / label / f"{name}.jpg"
            if not link.is_symlink():
                link.symlink_to((idrid_root / GRADING_IMAGES / f"{name}.jpg").resolve())
            counts[label] += 1
    return {**counts, "excluded": sorted(excluded)}


# --------------------------------------------------------------------------- the rows


def _context(quick: bool, minutes: float, workdir: Path, taskset) -> dict:
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


def run_name(key: str, ctx: dict) -> str:
    """The row's name in the results and its run directory: "<row>+<lever>" when screening."""
    return key if ctx.get("lever") is None else f"{key}+{ctx['lever']}"


def lever_recipe(recipe: Path, lever: str, workdir: Path) -> Path:
    """`recipe` with the overrides of `LEVERS[lever]`, written under `workdir/recipes`."""
    import tomllib

    from rmib.config import dump_toml

    data = tomllib.loads(recipe.read_text())
    for key, value in LEVERS[lever][1].items():
        if key == "_cli":  # command-line flags, appended to the row's command (they win)
            continue
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    out = workdir / "recipes" / f"{recipe.stem}+{lever}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# {recipe.name} with the lever {lever}: {LEVERS[lever][0]}\n" + dump_toml(data)
    )
    return out


def _rmib(*args) -> list[str]:
    return ["rmib", *map(str, args)]


def row_command(key: str, ctx: dict) -> list[str]:
    """The one command line that trains row `key` (without a taskset prefix)."""
    return [str(arg) for arg in _row_arguments(key, ctx)]


def _row_arguments(key: str, ctx: dict) -> list:
    lesion, kind, seed = ROWS[key]
    quick, out = ctx["quick"], ctx["workdir"] / run_name(key, ctx)
    common = ["--time-limit", ctx["minutes"], "--precision", "float32", "--seed", seed]
    common += ["--out", out]
    if kind in STAGE1_KINDS:
        size, batch = (64, 8) if quick else (256, 8)
        init = ["--cbam-init", "woo"] if kind == "stage1_woo" else []
        return _rmib(
            "pretrain", "--data", ctx["stage1_data"], "--backbone", "vgg16", "--cbam", *init,
            "--image-size", size, "--batch-size", batch, "--weights", "none",
            "--val-fraction", 0.2, "--epochs", 1000, *common,
        )  # fmt: skip
    val = [a for name in ctx["val_names"] for a in ("--val-names", name)]
    data = ["--data", ctx["data"], "--lesion", lesion, *val]
    if kind == "e":
        sizes = UNET_QUICK if quick else UNET
        return [
            "python", "-m", "benchmarks.idrid_real", "unet", *data,
            "--patch-size", sizes["patch_size"], "--scale", sizes["scale"],
            "--batch-size", sizes["batch_size"], *common,
        ]  # fmt: skip
    cache = ["--cache-dir", ctx["workdir"] / "cache"]
    small = ["--patch-size", 64, "--patches-per-epoch", 32, "--batch-size", 4] if quick else []
    recipe = PROJECT_ROOT / "segment"
    if kind in "ab":
        encoder = ctx["workdir"] / "stage1" if kind == "a" else "vgg16"
        scratch = ["--cbam", "--weights", "none"] if kind == "b" else []
        scale = ["--scale", 0.25] if quick else []
        config = recipe / f"idrid_{lesion.lower()}_vgg16_cbam.toml"
        if ctx.get("lever"):
            config = lever_recipe(config, ctx["lever"], ctx["workdir"])
        return _rmib(
            "segment", "--config", config,
            "--encoder", encoder, *scratch, *data, *cache, *small, *scale, "--epochs", 1000,
            *common, *(LEVERS[ctx["lever"]][1].get("_cli", []) if ctx.get("lever") else []),
        )  # fmt: skip
    if kind == "c":
        sizes = ["--global-size", 64, "--base-filters", 4] if quick else []
        return _rmib(
            "segment", "--config", recipe / "idrid_ex_local_global.toml", *data, *cache,
            *sizes, *common,
        )  # fmt: skip
    sizes = ["--image-size", *((64, 96) if quick else DUAL2NET_SIZE)]
    return _rmib(
        "segment", "--config", recipe / "idrid_ex_dual2net.toml", *data, *cache, *sizes,
        "--weights", "none", *common,
    )  # fmt: skip


def evaluate_command(key: str, ctx: dict) -> list[str]:
    run = ctx["workdir"] / run_name(key, ctx)
    names = [a for name in ctx["val_names"] for a in ("--names", name)]
    return _rmib(
        "evaluate", run, "--data", ctx["data"], *names, "--out", run / "evaluation",
        "--threshold", THRESHOLD, "--no-overlays",
    )  # fmt: skip


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
        command = _pin(row_command(stage1_key, ctx), ctx["taskset"])
        echo(f"idrid_real {stage1_key}: {shlex.join(command)}")
        seconds = _run(command, workdir / "logs" / f"{stage1_key}.log")
        run = workdir / stage1_key
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


# --------------------------------------------------------------------------- results


def load_results(path: Path) -> dict:
    """{"rows": {key: record}} of `path`, empty when it does not exist yet."""
    if not path.is_file():
        return {"rows": {}}
    results = json.loads(path.read_text())
    if not isinstance(results.get("rows"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'rows' object")
    return results


def save_results(path: Path, results: dict) -> None:
    from rmib.io import atomic_write

    with atomic_write(path) as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")


def pending_rows(results: dict, wanted, lever=None) -> list[str]:
    """The keys of `wanted` (in `ROWS` order) not yet measured in `results` (with `lever`)."""
    unknown = [k for k in wanted if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown idrid_real row(s) {unknown}; valid: {', '.join(ROWS)}")
    done = {k for k, row in results["rows"].items() if "ap" in row or "roc_auc" in row}
    ctx = {"lever": lever}
    return [k for k in ROWS if k in wanted and run_name(k, ctx) not in done]


def results_path(quick: bool, minutes: float, workdir: Path) -> Path:
    """Final rows go into the committed json; screening and quick rows stay in the work dir."""
    if quick:
        return workdir / "idrid_real_quick.json"
    if minutes != FINAL_MINUTES:
        return workdir / f"idrid_real_screening_{minutes:g}min.json"
    return RESULTS


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


def idrid_real(settings, peak, progress=None) -> dict:
    """The benchmark entry of `benchmarks.run`: train and score the pending rows."""
    quick = settings.quick
    minutes = 1.0 if quick else settings.idrid_minutes
    data = IDRID_SAMPLE if quick else IDRID
    if not data.is_dir():
        raise SystemExit(f"idrid_real needs {data}")
    workdir = _workdir(quick)
    ctx = _context(quick, minutes, workdir, settings.taskset)
    lever = getattr(settings, "idrid_lever", None)
    if lever is not None:
        if lever not in LEVERS:
            raise SystemExit(f"unknown lever {lever!r}; valid: {', '.join(LEVERS)}")
        if minutes == FINAL_MINUTES and not quick:
            raise SystemExit("--lever is for screening rows: give --minutes (e.g. 10)")
        ctx["lever"] = lever
    path = results_path(quick, minutes, workdir)
    results = load_results(path)
    results.update(results_file=str(path.relative_to(PROJECT_ROOT) if path == RESULTS else path))
    results.update(minutes=minutes, val_names=list(ctx["val_names"]), workdir=str(workdir))
    wanted = settings.idrid_rows or (QUICK_ROWS if quick else tuple(ROWS))
    cpu = _cpu_model()
    for key in pending_rows(results, wanted, ctx["lever"]):
        name = run_name(key, ctx)
        record = run_row(key, ctx, cpu)
        # Re-read before writing: a row pinned to the other core may have finished meanwhile.
        results["rows"] = {**load_results(path)["rows"], name: record}
        save_results(path, results)
        print(f"idrid_real {name}: {json.dumps(record, default=str)}", flush=True)
        if progress is not None:
            progress(results)
    return results


def _fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_idrid_real(result: dict, machine: dict, settings) -> str:
    """The BENCHMARKS.md section: every row of `ROWS`, "not measured yet" where not measured."""
    rows = result.get("rows", {})
    minutes = result.get("minutes", FINAL_MINUTES)
    val_names = result.get("val_names", VAL_NAMES)
    title = f"IDRiD, official training portion: {len(val_names)} validation photographs"
    if minutes != FINAL_MINUTES:
        title += f" — {minutes:g}-minute {'quick' if settings.quick else 'screening'} rows"
    lines = [
        f"### idrid_real: {title}",
        "",
        f"From `{result.get('results_file', 'benchmarks/idrid_real.json')}`; split "
        f"validation {', '.join(val_names)}. AP: every pixel pooled "
        "at full resolution; F1 at the threshold shown; region F at sigma 0.5; s/photo: "
        "`rmib evaluate` wall time per photograph. Each row is one command line "
        f"(`--time-limit {minutes:g}`, `--precision float32`), listed below the table.",
        "",
        "| row | lesion | model | seed | AP | F1 (thr) | region F | s/photo | CPU, pinning |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    final = minutes == FINAL_MINUTES
    for key, (lesion, kind, seed) in ROWS.items():
        names = [key] + sorted(n for n in rows if n.startswith(f"{key}+"))
        if rows.get(key) is None and final:
            lines.append(f"| {key} | {lesion or '—'} | {KIND_NAMES[kind]} | {seed} | "
                         "not measured yet | | | | |")  # fmt: skip
        for name in names:
            row = rows.get(name)
            if row is None:
                continue
            model = row["kind"]
            if row.get("lever"):
                model += f"; lever **{row['lever']['name']}**: {row['lever']['description']}"
            if row.get("epochs_trained"):
                epochs = row["epochs_trained"]
                model += f" ({epochs} epoch{'s' * (epochs != 1)}, kept {row.get('weights', 'last')}"
                model += f" {row['best_epoch']})" if row.get("best_epoch") else ")"
            if kind in STAGE1_KINDS:
                score = f"ROC AUC {_fmt(row['roc_auc'])} ({row['n']} validation photographs)"
                lines.append(f"| {name} | — | {model} | {seed} | {score} | | | | "
                             f"{row['cpu']}, {row['pinned']} |")  # fmt: skip
            else:
                lines.append(
                    f"| {name} | {lesion} | {model} | {seed} | {_fmt(row['ap'])} | "
                    f"{_fmt(row['f1'])} ({row['threshold']:g}) | {_fmt(row['region_f'])} | "
                    f"{_fmt(row['seconds_per_photograph'], 1)} | {row['cpu']}, {row['pinned']} |"
                )
            stage1 = f" (stage 1: {row['stage1_run']})" if row.get("stage1_run") else ""
            lever = row.get("lever")
            overrides = f" recipe overrides `{json.dumps(lever['overrides'])}`," if lever else ""
            commands.append(f"- {name}{stage1}:{overrides} `{row['command']}`")
    cost = result.get("frozen_cost")
    if cost:
        lines += [
            "",
            f"The cost of a frozen encoder ({cost['backbone']}, {cost['size']}-px patches, batch "
            f"{cost['batch']}, float32, one core; `python -m benchmarks.idrid_real frozen-cost "
            f"{cost['size']} {cost['batch']}`):",
            "",
            "| frozen step | encoder forward | decoder-only step | frozen / (forward + decoder) "
            "| trainable step |",
            "| --- | --- | --- | --- | --- |",
            f"| {cost['frozen_step']:.2f} s | {cost['encoder_forward']:.2f} s | "
            f"{cost['decoder_step']:.2f} s | {cost['frozen_over_parts']:.2f} | "
            f"{cost['trainable_step']:.2f} s |",
        ]
    if result.get("notes"):
        lines += ["", *(f"- {note}" for note in result["notes"])]
    if commands:
        lines += ["", "Commands:", "", *commands]
    return "\n".join(lines)


# --------------------------------------------------------------------------- row (e)


def train_reference_unet(argv=None) -> None:
    """`python -m benchmarks.idrid_real unet ...`: the plain U-Net reference of row (e)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idrid_real unet")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--lesion", required=True, choices=("EX", "HE", "MA", "SE"))
    parser.add_argument("--val-names", action="append", default=[])
    parser.add_argument("--patch-size", type=int, default=UNET["patch_size"])
    parser.add_argument("--scale", type=float, default=UNET["scale"])
    parser.add_argument("--batch-size", type=int, default=UNET["batch_size"])
    parser.add_argument("--time-limit", type=float, required=True)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    from rmib import losses, training
    from rmib.config import TrainConfig
    from rmib.data.pipeline import (
        Preprocessing,
        load_examples,
        patch_dataset,
        rescale_example,
        split_by_names,
    )
    from rmib.methods.segment_data import lesion_records
    from rmib.models.unet import build_unet

    records = lesion_records([args.data], args.lesion)
    train_records, val_records = split_by_names(records, args.val_names)
    prep = Preprocessing(method="none")
    examples, _ = load_examples(train_records, prep, args.lesion)
    examples = [rescale_example(e, args.scale) for e in examples]
    steps = 50  # per epoch: the time limit, checked after each epoch, ends training
    config = TrainConfig(
        epochs=1000, batch_size=args.batch_size, learning_rate=1e-3, optimizer="adam",
        lr_schedule="constant", monitor="loss", monitor_mode="min", precision=args.precision,
        seed=args.seed, time_limit=args.time_limit,
    )  # fmt: skip
    dataset = patch_dataset(
        examples, args.patch_size, args.batch_size, steps, pos_fraction=0.5, augment="rot90",
        seed=args.seed, start_epoch=0, epochs=config.epochs,
    )  # fmt: skip
    metadata = {
        "task": "segment",
        "model": "encoder-decoder",  # fully convolutional: predicted by TiledSegmenter
        "reference": "plain 4-level U-Net, base width 16, batch norm, BCE + Dice (keras-io)",
        "lesion": args.lesion,
        "preprocessing": prep.to_dict(),
        "patch_size": args.patch_size,
        "scale": args.scale,
        "predict_tile": "auto",
        "predict_halo": 64,
        "predict_max_tile": 1024,
        "size_multiple": 2 ** UNET["depth"],
        "loss": "bce+dice",
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
    }
    training.fit(
        lambda: build_unet(UNET["depth"], UNET["base_filters"], max_filters=1024),
        dataset,
        None,
        config=config,
        run_dir=training.RunDirectory(args.out),
        loss=losses.get_loss("bce+dice"),
        metadata=metadata,
        steps_per_epoch=steps,
    )


def frozen_encoder_cost(size=256, batch=8, warmup=2, steps=5, backbone="vgg16") -> dict:
    """Seconds of one training step of the encoder-decoder: frozen, trainable, and in parts.

    The lever "the cost of a frozen encoder": a frozen step is compared with the
    encoder's forward pass plus a decoder-only step on precomputed features (the same
    decoder layers fed the encoder's taps). If the frozen step is no slower than that
    sum, the backward pass already stops at the encoder and there is nothing to save.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from rmib.methods.encoder_decoder.model import build_encoder_decoder, decode
    from rmib.models.backbones import build_backbone, tap_strides

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    masks = (rng.uniform(size=(batch, size, size, 1)) > 0.95).astype("float32")

    def timed(step) -> float:
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    def train_step_seconds(model, inputs) -> float:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        return timed(lambda: model.train_on_batch(inputs, masks))

    encoder = build_backbone(backbone, cbam=True, weights="none", model_name="backbone")
    frozen = build_encoder_decoder(encoder, freeze_encoder=True)
    result = {"size": size, "batch": batch, "backbone": f"{backbone}_cbam"}
    result["frozen_step"] = train_step_seconds(frozen, images)
    forward = tf.function(lambda x: encoder(x, training=False))
    result["encoder_forward"] = timed(lambda: [t.numpy() for t in forward(images).values()])
    taps = {k: v.numpy() for k, v in forward(images).items()}
    # The decoder alone: the same layers (`decode`) on Inputs shaped like the taps.
    inputs = {k: keras.Input(shape=(None, None, v.shape[-1]), name=k) for k, v in taps.items()}
    decoder = keras.Model(inputs, decode(inputs, tap_strides(encoder)), name="decoder_only")
    result["decoder_step"] = train_step_seconds(decoder, taps)
    encoder.trainable = True
    trainable = build_encoder_decoder(encoder, freeze_encoder=False)
    result["trainable_step"] = train_step_seconds(trainable, images)
    result["frozen_over_parts"] = result["frozen_step"] / (
        result["encoder_forward"] + result["decoder_step"]
    )
    return result


def render_committed(out: Path, results_file: Path = RESULTS) -> None:
    """Re-render the BENCHMARKS.md section of measured rows, measuring nothing.

    `results_file` is the committed json (the final rows) or a screening json of
    the work directory, whose rows go into their own "screening" section.
    """
    from benchmarks import run

    results = load_results(results_file)
    shown = results_file.relative_to(PROJECT_ROOT) if results_file == RESULTS else results_file
    results.setdefault("results_file", str(shown))
    settings = run.Settings(idrid_minutes=results.get("minutes", FINAL_MINUTES))
    key = run.section_key("idrid_real", settings)
    run.merge_sections(out, {key: render_idrid_real(results, {}, settings)})


USAGE = (
    "usage: python -m benchmarks.idrid_real unet --data ROOT ...  (row e)\n"
    "       python -m benchmarks.idrid_real render BENCHMARKS.md [RESULTS.json]  (measured rows)\n"
    "       python -m benchmarks.idrid_real frozen-cost [SIZE BATCH]  (a frozen step in parts)"
)

if __name__ == "__main__":
    if sys.argv[1:2] == ["unet"]:
        train_reference_unet(sys.argv[2:])
    elif sys.argv[1:2] == ["frozen-cost"]:
        size, batch = (int(v) for v in (sys.argv[2:4] or (256, 8)))
        print(json.dumps(frozen_encoder_cost(size, batch), indent=2))
    elif sys.argv[1:2] == ["render"] and len(sys.argv) in (3, 4):
        render_committed(Path(sys.argv[2]), *(Path(a).resolve() for a in sys.argv[3:]))
    else:
        raise SystemExit(USAGE)
