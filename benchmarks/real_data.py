"""`idrid_transfer`: does the stage-1 transfer pay for itself on real photographs? (issue #4)

The RMIB paper's central claim, on the real samples in `../shared/data`:

1. stage 1: `rmib pretrain` a VGG16-CBAM lesion / healthy classifier on a
   synthetic Kaggle-layout set plus the EyePACS sample (25 graded photographs);
2. stage 2, transferred: `rmib segment --encoder STAGE1_RUN` (the classifier's
   backbone frozen as the encoder) for hard exudates on IDRiD_01..07,
   validated on the whole photographs IDRiD_08..10;
3. stage 2, from scratch: the same segmenter with `--encoder vgg16 --cbam
   --weights none` (a trainable, randomly initialised encoder), with the
   **same wall-clock training time** (`--time-limit`).

Every step is the real command line in a fresh child process, run one after
the other on an otherwise idle machine; the two stage-2 runs share every
setting but the encoder. Validation: AUPR of the pixels of the three
validation photographs pooled, at full resolution through tiled prediction,
as `rmib segment` reports it (metrics.json "validation").

The sample is tiny (7 training photographs, 3 validation photographs): the
numbers show that the pipeline runs end to end on real photographs and how
the two encoders compare at equal time here, not what they reach on IDRiD.

    python -m benchmarks.run --only idrid_transfer --out benchmarks/BENCHMARKS.md

Not part of the default `make bench` run (it takes about an hour).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import fmt, load_average, run_line, table

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
IDRID = SHARED_DATA / "idrid-sample"
EYEPACS = SHARED_DATA / "eyepacs-sample"
VAL_NAMES = ("IDRiD_08", "IDRiD_09", "IDRiD_10")
FULL = {
    "synth_count": 96,
    "synth_size": 512,
    "stage1_size": 224,
    "stage1_epochs": 4,
    "stage1_batch": 8,
    "patch_size": 160,
    "patches_per_epoch": 256,
    "batch_size": 8,
    "time_limit": 12.0,
    "predict_tile": 512,
}
QUICK = {
    "synth_count": 8,
    "synth_size": 96,
    "stage1_size": 64,
    "stage1_epochs": 1,
    "stage1_batch": 4,
    "patch_size": 64,
    "patches_per_epoch": 8,
    "batch_size": 4,
    "time_limit": 0.2,
    "predict_tile": 512,
}
TIMEOUT = 3 * 3600


def _rmib(args, log: Path) -> float:
    """Run `python -m rmib ARGS` in a child, its output to `log`; returns its wall seconds."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "rmib", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=TIMEOUT,
            cwd=PROJECT_ROOT,
        ).returncode
    seconds = time.monotonic() - start
    if code:
        tail = log.read_text()[-3000:]
        raise RuntimeError(
            f"rmib {' '.join(map(str, args[:2]))} failed ({code}); log {log}:\n{tail}"
        )
    return seconds


def _segment_recipe(path: Path, sizes: dict) -> Path:
    """The stage-2 settings both runs share (validation only at the last epoch)."""
    path.write_text(
        f"""lesion = "EX"
model = "encoder-decoder"
patch_size = {sizes["patch_size"]}
patches_per_epoch = {sizes["patches_per_epoch"]}
pos_fraction = 0.5
loss = "bce"
preprocessing = "clahe"
augment = "free"
predict_tile = {sizes["predict_tile"]}
predict_overlap = 0.125
val_every = 1000

[train]
epochs = 1000
batch_size = {sizes["batch_size"]}
learning_rate = 1e-3
lr_schedule = "constant"
monitor = "val_aupr"
monitor_mode = "max"
precision = "float32"
time_limit = {sizes["time_limit"]}
seed = 0
"""
    )
    return path


def _read(run: Path) -> tuple[dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    return metrics, state


def idrid_transfer(settings, peak, progress=None) -> dict:
    """Run the experiment; returns its rows (or a `skipped` reason without the data)."""
    if not (IDRID.is_dir() and EYEPACS.is_dir()):
        return {"skipped": f"the real samples are not at {SHARED_DATA}"}
    sizes = dict(QUICK if settings.quick else FULL)
    work = Path(os.environ.get("RMIB_BENCH_WORKDIR", "/tmp/rmib-idrid-transfer"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"sizes": sizes, "workdir": str(work), "rows": [], "steps": {}}
    stage1 = work / "stage1"
    stage1_key = {k: sizes[k] for k in sizes if k.startswith(("synth", "stage1"))}
    done = work / "stage1.json"
    if done.is_file() and json.loads(done.read_text()).get("sizes") == stage1_key:
        # A finished stage 1 of the same sizes (an earlier, interrupted run) is reused.
        result["stage1"] = json.loads(done.read_text())["stage1"]
    else:
        for path in (work / "synth-kaggle", stage1):
            if path.exists():
                shutil.rmtree(path)
        synth = work / "synth-kaggle"
        result["steps"]["synth_seconds"] = _rmib(
            [
                "data", "synth", synth, "--layout", "kaggle",
                "--count", sizes["synth_count"], "--size", sizes["synth_size"], "--seed", 0,
            ],
            work / "synth.log",
        )  # fmt: skip
        load = load_average()
        seconds = _rmib(
            [
                "pretrain", "--data", synth, "--data", EYEPACS,
                "--backbone", "vgg16", "--cbam", "--image-size", sizes["stage1_size"],
                "--epochs", sizes["stage1_epochs"], "--batch-size", sizes["stage1_batch"],
                "--precision", "float32", "--seed", 0, "--out", stage1,
            ],
            work / "stage1.log",
        )  # fmt: skip
        stage1_metrics = json.loads((stage1 / "metrics.json").read_text())["validation"]
        result["stage1"] = {"seconds": seconds, "load": load, **stage1_metrics}
        done.write_text(json.dumps({"sizes": stage1_key, "stage1": result["stage1"]}))
    if progress:
        progress(result)

    recipe = _segment_recipe(work / "segment.toml", sizes)
    runs = {
        "transferred": ["--encoder", stage1],
        "scratch": ["--encoder", "vgg16", "--cbam", "--weights", "none"],
    }
    for label, encoder in runs.items():
        out = work / f"ex-{label}"
        if out.exists():
            shutil.rmtree(out)
        load = load_average()
        seconds = _rmib(
            [
                "segment", "--config", recipe, "--data", IDRID,
                *(x for name in VAL_NAMES for x in ("--val-names", name)),
                *encoder, "--out", out,
            ],
            work / f"ex-{label}.log",
        )  # fmt: skip
        metrics, state = _read(out)
        training = metrics.get("training", {})
        validation = metrics.get("validation", {})
        result["rows"].append(
            {
                "encoder": label,
                "epochs": state.get("epoch"),
                "train_seconds": state.get("train_seconds"),
                "process_seconds": seconds,
                "patches_seen": int(state.get("epoch", 0)) * sizes["patches_per_epoch"],
                "val_aupr": validation.get("aupr"),
                "val_f1": validation.get("f1"),
                "val_iou": validation.get("iou"),
                "val_sensitivity": validation.get("sensitivity"),
                "val_ppv": validation.get("ppv"),
                "time_limited": training.get("time_limited"),
                "load": load,
            }
        )
        if progress:
            progress(result)
    return result


def render_idrid_transfer(result: dict, machine: dict, settings) -> str:
    """The Markdown section of `idrid_transfer`."""
    title = "## idrid_transfer: transferred vs from-scratch encoder on real IDRiD photographs\n\n"
    if "skipped" in result:
        return title + f"Skipped: {result['skipped']}.\n"
    s = result["sizes"]
    lines = [title, run_line(machine, settings), ""]
    lines.append(
        "Hard exudates (EX), VGG16-CBAM encoder-decoder, trained on IDRiD_01..07 of "
        f"`../shared/data/idrid-sample` ({s['patches_per_epoch']} lesion-aware "
        f"{s['patch_size']}-px patches per epoch, batch {s['batch_size']}, Adam 1e-3, "
        "binary cross-entropy, CLAHE, free augmentation, float32) and validated once, after "
        "the last epoch, on the whole photographs IDRiD_08..10 (pixels pooled, full "
        f"resolution, tiles of {s['predict_tile']} px). Both runs get the same training time: "
        f"`--time-limit {s['time_limit']:g}` minutes (a run stops after the last epoch that "
        'fits; "training s" also counts the validation after that epoch). Stage 1 (the transferred encoder): '
        f"`rmib pretrain --backbone vgg16 --cbam` at {s['stage1_size']} px, "
        f"{s['stage1_epochs']} epochs, on {s['synth_count']} synthetic Kaggle-layout "
        "photographs plus the 25 EyePACS sample photographs. Reproduce: "
        "`python -m benchmarks.run --only idrid_transfer --out benchmarks/BENCHMARKS.md`."
    )
    stage1 = result.get("stage1")
    if stage1:
        lines.append("")
        lines.append(
            f"Stage 1: {stage1['seconds']:.0f} s; on its validation split "
            f"({stage1.get('n')} photographs) accuracy {fmt(stage1.get('accuracy'), 3)}, "
            f"ROC AUC {fmt(stage1.get('roc_auc'), 3)} (load {stage1['load']})."
        )
    rows = []
    for row in result["rows"]:
        rows.append(
            [
                {"transferred": "stage-1 VGG16-CBAM, frozen", "scratch": "VGG16-CBAM from scratch"}[
                    row["encoder"]
                ],
                fmt(row["train_seconds"], 0),
                row["epochs"],
                row["patches_seen"],
                fmt(row["val_aupr"], 3),
                fmt(row["val_f1"], 3),
                fmt(row["val_iou"], 3),
                fmt(row["val_sensitivity"], 3),
                fmt(row["val_ppv"], 3),
                fmt(row["process_seconds"], 0),
                row["load"],
            ]
        )
    if rows:
        lines.append("")
        lines.append(
            table(
                [
                    "encoder",
                    "training s",
                    "epochs",
                    "patches seen",
                    "val AUPR",
                    "val F1 @0.5",
                    "val IoU",
                    "val sensitivity",
                    "val PPV",
                    "process s",
                    "load at start",
                ],
                rows,
            )
        )
    if len(result["rows"]) == 2:
        t, f = result["rows"]
        if t["val_aupr"] is not None and f["val_aupr"] is not None:
            lines.append("")
            lines.append(
                f"**Validation AUPR at equal training time: transferred {t['val_aupr']:.3f}, "
                f"from scratch {f['val_aupr']:.3f}** ({t['epochs']} vs {f['epochs']} epochs)."
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tile_aupr
#
# Issue #4: "validation AUPR with the large tiles not lower than with
# training-size tiles". One EX segmenter (the from-scratch VGG16-CBAM of
# idrid_transfer's recipe, trained on IDRiD_01..07 under a time limit) is
# evaluated on the whole photographs IDRiD_08..10 three ways: tiles of the
# training patch (160 px), the earlier fixed 512-px tiles, and the planned large
# tiles of `--tile auto`. Same model, same photographs: only the tiling differs.

TILINGS = (
    ("training-size tiles", ["--tile", "160", "--overlap", "0.25"]),
    ("fixed 512-px tiles", ["--tile", "512", "--overlap", "0.125"]),
    ("auto (large tiles, halo 64)", ["--tile", "auto", "--halo", "64"]),
    ("auto, halo 128", ["--tile", "auto", "--halo", "128"]),
    ("auto, tiles of at most 384x384", ["--tile", "auto", "--halo", "64", "--max-tile", "384"]),
)
QUICK_TILINGS = (
    ("training-size tiles", ["--tile", "64", "--overlap", "0.25"]),
    ("auto (large tiles, halo 64)", ["--tile", "auto", "--halo", "64"]),
)


def tile_aupr(settings, peak, progress=None) -> dict:
    """Train (or reuse) one EX segmenter, then evaluate it with each tiling."""
    if not IDRID.is_dir():
        return {"skipped": f"the IDRiD sample is not at {SHARED_DATA}"}
    sizes = dict(QUICK if settings.quick else FULL)
    work = Path(os.environ.get("RMIB_BENCH_WORKDIR", "/tmp/rmib-tile-aupr"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "ex-scratch"
    result: dict = {"sizes": sizes, "workdir": str(work), "rows": []}
    if not (run / "metrics.json").is_file():  # a finished run of an earlier call is reused
        if run.exists():
            shutil.rmtree(run)
        recipe = _segment_recipe(work / "segment.toml", sizes)
        _rmib(
            [
                "segment", "--config", recipe, "--data", IDRID,
                *(x for name in VAL_NAMES for x in ("--val-names", name)),
                "--encoder", "vgg16", "--cbam", "--weights", "none", "--out", run,
            ],
            work / "train.log",
        )  # fmt: skip
    metrics, state = _read(run)
    result["training"] = {"epochs": state.get("epoch"), "train_seconds": state.get("train_seconds")}
    for label, tiling in QUICK_TILINGS if settings.quick else TILINGS:
        name = "eval-" + "-".join(tiling[1::2])
        out, record = work / name, work / f"{name}.json"
        if record.is_file() and (out / "metrics.json").is_file():
            # Evaluated by an earlier call with the same flags and model: reused.
            seconds, load = (json.loads(record.read_text())[k] for k in ("seconds", "load"))
        else:
            load = load_average()
            seconds = _rmib(
                [
                    "evaluate", run, "--data", IDRID,
                    *(x for name in VAL_NAMES for x in ("--names", name)),
                    "--out", out, "--no-overlays", *tiling,
                ],
                work / f"{name}.log",
            )  # fmt: skip
            record.write_text(json.dumps({"seconds": seconds, "load": load}))
        scores = json.loads((out / "metrics.json").read_text())
        result["rows"].append(
            {
                "tiling": label,
                "args": " ".join(tiling),
                "aupr": scores.get("aupr"),
                "f1": scores.get("f1"),
                "iou": scores.get("iou"),
                "images": scores.get("images"),
                "seconds": seconds,
                "load": load,
            }
        )
        if progress:
            progress(result)
    return result


def render_tile_aupr(result: dict, machine: dict, settings) -> str:
    """The Markdown section of `tile_aupr`."""
    title = "## tile_aupr: validation AUPR with large tiles vs training-size tiles\n\n"
    if "skipped" in result:
        return title + f"Skipped: {result['skipped']}.\n"
    training = result.get("training", {})
    lines = [title, run_line(machine, settings), ""]
    lines.append(
        "One hard-exudate segmenter (VGG16-CBAM encoder-decoder from scratch, idrid_transfer's "
        f"recipe: {training.get('epochs')} epochs, {fmt(training.get('train_seconds'), 0)} s "
        "of training on IDRiD_01..07) evaluated with `rmib evaluate --names IDRiD_08 ... "
        "--no-overlays` on the whole validation photographs IDRiD_08..10 at full resolution "
        "(pixels of the three pooled), float32, each tiling in a fresh process. Only the "
        "tiling differs. Reproduce: `python -m benchmarks.run --only tile_aupr --out "
        "benchmarks/BENCHMARKS.md` (trains the model first, about 15 minutes, unless "
        "`$RMIB_BENCH_WORKDIR/ex-scratch` holds a finished run)."
    )
    rows = [
        [
            row["tiling"],
            f"`{row['args']}`",
            fmt(row["aupr"], 4),
            fmt(row["f1"], 4),
            fmt(row["iou"], 4),
            fmt(row["seconds"], 0),
            row["load"],
        ]
        for row in result["rows"]
    ]
    if rows:
        lines += [
            "",
            table(
                ["tiling", "flags", "val AUPR", "F1 @0.5", "IoU @0.5", "process s", "load"],
                rows,
            ),
        ]
    return "\n".join(lines) + "\n"
