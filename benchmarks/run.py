"""rmib's benchmark harness: `python -m benchmarks.run --out benchmarks/BENCHMARKS.md`.

Every run measures the machine's peak first (DESIGN.md "How performance is
counted": a 3x3 convolution on an 8x128x128x256 tensor and a 4096^3 matmul,
float32 and bfloat16), then the benchmarks asked for, and writes one Markdown
section per benchmark. Numbers measured in one run are comparable with each
other (same machine, same load); the ratios printed beside them are the
numbers to trust on a shared machine.

    python -m benchmarks.run --quick                      # tiny sizes, a smoke test
    python -m benchmarks.run --only tiled_prediction      # one benchmark
    python -m benchmarks.run --only pretrain_throughput --models vgg16,keras_vgg16

The sections of the benchmarks a run does not re-measure are kept in `--out`
(`make bench` keeps the real-data ones it never runs; `--only` keeps the rest).
The tiled-prediction runs go to child processes so that each one's peak
resident memory is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    NOISE_NOTE,
    fmt,
    load_average,
    peak_for,
    peak_line,
    percent,
    photograph,
    run_line,
    table,
)
from benchmarks.idrid_real import idrid_real, render_idrid_real
from benchmarks.local_global import local_global_prediction, render_local_global
from benchmarks.multiworker import multiworker_throughput, render_multiworker
from benchmarks.pretrain_summary import conv_peak_ratio, conv_share, step_gflop, summary_rows
from benchmarks.real_data import idrid_transfer, render_idrid_transfer, render_tile_aupr, tile_aupr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "mixed_bfloat16")
# name -> (label, builder arguments); "keras_*" are plain keras.applications models.
PRETRAIN_MODELS = {
    "vgg16": ("rmib VGG16", ("vgg16", False)),
    "vgg16_cbam": ("rmib VGG16-CBAM", ("vgg16", True)),
    "keras_vgg16": ("keras.applications VGG16", ("keras", "VGG16")),
    "resnet50": ("rmib ResNet50", ("resnet50", False)),
    "resnet50_cbam": ("rmib ResNet50-CBAM", ("resnet50", True)),
    "keras_resnet50": ("keras.applications ResNet50", ("keras", "ResNet50")),
}
# Which keras.applications model each rmib model is compared with.
KERAS_TWIN = {
    "vgg16": "keras_vgg16",
    "vgg16_cbam": "keras_vgg16",
    "resnet50": "keras_resnet50",
    "resnet50_cbam": "keras_resnet50",
}


@dataclasses.dataclass
class Settings:
    """Sizes and step counts of one run; `quick()` shrinks them for a smoke test."""

    conv_shape: tuple = (8, 128, 128, 256)
    matmul_size: int = 4096
    peak_repeats: int = 3
    image_size: int = 224  # pretrain_throughput; --image-size 480 for the training size
    batch_size: int = 4
    warmup_steps: int = 3
    timed_steps: int = 5
    models: tuple = tuple(PRETRAIN_MODELS)
    precisions: tuple = PRECISIONS
    photo_shape: tuple = (2848, 4288)
    large_photo_shape: tuple = (4000, 6000)
    tile: int = 512
    naive_patch: int = 160
    naive: bool = True
    memory_check: bool = True
    quick: bool = False
    tag: str = ""
    idrid_rows: tuple = ()
    idrid_minutes: float = 30.0
    idrid_lever: str | None = None
    taskset: int | None = None

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            conv_shape=(1, 32, 32, 32),
            matmul_size=256,
            peak_repeats=2,
            image_size=32,
            batch_size=2,
            warmup_steps=1,
            timed_steps=1,
            models=("vgg16", "keras_vgg16"),
            photo_shape=(96, 128),
            large_photo_shape=(128, 160),
            tile=64,
            naive_patch=32,
            quick=True,
        )


# --------------------------------------------------------------------------- machine


def machine_description() -> dict:
    """CPU model, core count, bfloat16 flags, TensorFlow/Keras versions, load."""
    import keras
    import tensorflow as tf

    from rmib import training

    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in wanted},
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "auto_precision": training.resolve_precision("auto"),
        "load": os.getloadavg(),
    }


# --------------------------------------------------------------------------- peak


def _time_best(function, repeats: int) -> float:
    function()  # trace and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(settings: Settings) -> dict:
    """GFLOP/s of the reference conv and matmul in float32 and bfloat16.

    Returns:
        {"conv": {dtype: GFLOP/s or None}, "matmul": {...}, "peak": {dtype: max}};
        None where the dtype's kernel is missing.
    """
    import keras
    import tensorflow as tf

    batch, height, width, channels = settings.conv_shape
    conv_flops = 2 * batch * height * width * channels * 9 * channels
    size = settings.matmul_size
    matmul_flops = 2 * size**3
    result: dict = {"conv": {}, "matmul": {}, "peak": {}}
    for dtype in ("float32", "bfloat16"):
        images = keras.random.uniform(settings.conv_shape, dtype="float32")
        kernel = keras.random.uniform((3, 3, channels, channels), dtype="float32")
        left = keras.random.uniform((size, size), dtype="float32")
        right = keras.random.uniform((size, size), dtype="float32")
        images, kernel, left, right = (
            keras.ops.cast(t, dtype) for t in (images, kernel, left, right)
        )

        # A scalar result makes sure the work is done before the clock stops.
        @tf.function
        def conv(images=images, kernel=kernel):
            return keras.ops.sum(keras.ops.conv(images, kernel, padding="same")[:, :1, :1])

        @tf.function
        def matmul(left=left, right=right):
            return keras.ops.sum(keras.ops.matmul(left, right)[:1])

        for name, function, flops in (
            ("conv", conv, conv_flops),
            ("matmul", matmul, matmul_flops),
        ):
            try:
                seconds = _time_best(lambda f=function: float(f()), settings.peak_repeats)
                result[name][dtype] = flops / seconds / 1e9
            except (tf.errors.OpError, NotImplementedError) as exc:
                print(f"peak {name} {dtype}: not available ({str(exc).splitlines()[0]})")
                result[name][dtype] = None
        values = [result[n][dtype] for n in ("conv", "matmul") if result[n][dtype]]
        result["peak"][dtype] = max(values) if values else None
    result["load"] = load_average()
    return result


# --------------------------------------------------------------------------- pretraining


def _keras_application_classifier(name: str, image_size: int):
    """keras.applications `name` (weights=None) with the head of build_classifier."""
    import keras

    application = getattr(keras.applications, name)
    base = application(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.Dense(
        256, use_bias=False, kernel_regularizer=keras.regularizers.L2(1e-4), name="head_dense"
    )(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Activation("relu", name="head_relu")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="lesion")(x)
    return keras.Model(base.input, outputs, name=f"keras_{name.lower()}_classifier")


def build_pretrain_model(name: str, image_size: int):
    """The classifier `name` of PRETRAIN_MODELS under the current dtype policy."""
    from rmib.models import build_classifier

    kind, argument = PRETRAIN_MODELS[name][1]
    if kind == "keras":
        return _keras_application_classifier(argument, image_size)
    return build_classifier(kind, cbam=argument, image_size=image_size)


def _compiled_for_training(model, settings: Settings):
    """Compile `model` as the training runner compiles a classifier; a warm-up step function."""
    import keras
    import numpy as np

    from rmib import training
    from rmib.config import TrainConfig

    model.compile(
        optimizer=training.make_optimizer(TrainConfig(), steps_per_epoch=100),
        loss=keras.losses.BinaryCrossentropy(),
    )
    rng = np.random.default_rng(0)
    shape = (settings.batch_size, settings.image_size, settings.image_size, 3)
    images = rng.uniform(0, 255, shape).astype(np.float32)
    labels = rng.integers(0, 2, (settings.batch_size, 1)).astype(np.float32)

    def step() -> float:
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        return time.perf_counter() - start

    return step


def _families(models) -> list[list[str]]:
    """Models timed together: each keras.applications model with its rmib variants."""
    groups: dict[str, list[str]] = {}
    for name in models:
        groups.setdefault(KERAS_TWIN.get(name, name), []).append(name)
    return list(groups.values())


def pretrain_throughput(settings: Settings, peak: dict, progress=None) -> dict:
    """Training images/s of the stage-1 classifiers, float32 vs mixed_bfloat16."""
    import keras

    from benchmarks.flops import TRAIN_STEP_FACTOR, model_flops
    from rmib import training

    rows = []
    shape = (settings.image_size, settings.image_size, 3)
    runs = [(n, p) for n in settings.models for p in settings.precisions]

    def result(pending=()):
        return {
            "settings": {
                "image_size": settings.image_size,
                "batch_size": settings.batch_size,
                "warmup_steps": settings.warmup_steps,
                "timed_steps": settings.timed_steps,
            },
            "rows": rows,
            "auto_precision": training.resolve_precision("auto"),
            "cpu_bfloat16": training.cpu_supports_bfloat16(),
            "conv_peak": peak["conv"],
            "pending": list(pending),
        }

    # The models of a family (rmib variants, the keras.applications twin, every
    # precision) are built together and their timed steps taken in turns, so a
    # change in the machine's load hits them all alike and their ratios hold.
    for family in _families(settings.models):
        keras.backend.clear_session()
        steps, flops = {}, {}
        for name in family:
            for precision in settings.precisions:
                keras.mixed_precision.set_global_policy(precision)
                try:
                    model = build_pretrain_model(name, settings.image_size)
                finally:
                    keras.mixed_precision.set_global_policy("float32")
                flops.setdefault(name, model_flops(model, shape))
                steps[name, precision] = _compiled_for_training(model, settings)
        load = load_average()
        for step in steps.values():
            for _ in range(settings.warmup_steps):
                step()
        seconds = {key: [] for key in steps}
        for _ in range(settings.timed_steps):
            for key, step in steps.items():
                seconds[key].append(step())
        for (name, precision), times in seconds.items():
            median = statistics.median(times)
            achieved = TRAIN_STEP_FACTOR * flops[name] * settings.batch_size / median / 1e9
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "forward_gflop": flops[name] / 1e9,
                    "step_seconds": median,
                    "step_spread": (min(times), max(times)),
                    "images_per_second": settings.batch_size / median,
                    "gflops": achieved,
                    "peak_percent": percent(achieved, peak_for(peak, precision)),
                    "load": load,
                }
            )
            print(
                f"pretrain {name} {precision}: {settings.batch_size / median:.3f} images/s "
                f"({achieved:.1f} GFLOP/s)",
                flush=True,
            )
        del steps
        done = {(row["model"], row["precision"]) for row in rows}
        if progress and len(done) < len(runs):
            progress(result(f"{n} {p}" for n, p in runs if (n, p) not in done))
    keras.backend.clear_session()
    return result()


# --------------------------------------------------------------------------- tiled prediction


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_rss_high_water_mark() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0) so it covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_tiled(job: dict) -> dict:
    """One prediction measurement, run in its own process (see `_run_child`).

    job: {"mode": "auto" | "tiled" | "naive", "precision", "shape": (H, W), "tile", "quick"}:
    "auto" = TiledSegmenter's planned large tiles over the field of view (the
    default of `rmib predict`), "tiled" = fixed square tiles of `tile` px.
    """
    import keras
    import numpy as np

    from benchmarks.flops import model_flops
    from rmib.data.pipeline import Preprocessing, preprocess_array
    from rmib.methods.encoder_decoder.model import build_encoder_decoder
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    keras.mixed_precision.set_global_policy(job["precision"])
    model = build_encoder_decoder("vgg16", cbam=True)
    tile = int(job["tile"])
    # FLOPs of a fully convolutional network are proportional to the pixels it
    # sees (sides multiples of 32): counted once on a reference tile.
    tile_flops = model_flops(model, (tile, tile, 3))
    tiles, pixels, shapes = [], [], set()
    plan = None
    if job["mode"] in ("tiled", "auto"):
        if job["mode"] == "auto":
            segmenter = TiledSegmenter(model, {"lesion": "EX"}, "auto")
        else:
            segmenter = TiledSegmenter(model, {"lesion": "EX"}, tile=tile)
        inner = segmenter._predict

        def counting(batch):
            tiles.append(int(batch.shape[0]))
            pixels.append(int(batch.shape[0] * batch.shape[1] * batch.shape[2]))
            shapes.add(f"{int(batch.shape[2])}x{int(batch.shape[1])}")
            return inner(batch)

        segmenter._predict = counting
        warmup = np.full((tile, tile, 3), 128, np.uint8)
        segmenter.predict(warmup)  # traces the prediction function

        def predict(image):
            return segmenter.predict(image)

    else:
        # The authors' notebooks: non-overlapping patches, one float32 patch per
        # model.predict call (edge patches zero-padded to the patch size).
        preprocessing = Preprocessing()

        def predict(image):
            prepared, _, _ = preprocess_array(image, preprocessing)
            height, width = prepared.shape[:2]
            out = np.zeros((height, width), np.float32)
            for y in range(0, height, tile):
                for x in range(0, width, tile):
                    patch = np.zeros((1, tile, tile, 3), np.float32)
                    piece = prepared[y : y + tile, x : x + tile]
                    patch[0, : piece.shape[0], : piece.shape[1]] = piece
                    tiles.append(1)
                    pixels.append(tile * tile)
                    prob = model.predict(patch, verbose=0)[0, : piece.shape[0], : piece.shape[1], 0]
                    out[y : y + tile, x : x + tile] = prob
            return out

        model.predict(np.zeros((1, tile, tile, 3), np.float32), verbose=0)
    tiles.clear()
    pixels.clear()
    shapes.clear()
    # The prediction's own peak: the high-water mark is reset after the model is
    # built and warmed up (import and tracing peaks are not the photograph's).
    baseline = _rss_bytes()
    reset = _reset_rss_high_water_mark()
    image, source = photograph(job["shape"], job.get("quick", False))
    start = time.perf_counter()
    prob = predict(image)
    seconds = time.perf_counter() - start
    assert prob.shape == image.shape[:2], prob.shape
    if job["mode"] == "auto":
        plan = segmenter.last_plan[0]
    return {
        "seconds": seconds,
        "tiles": sum(tiles),
        "pixels": sum(pixels),
        "tile_shapes": sorted(shapes) or [f"{tile}x{tile}"],
        "plan": plan,
        "tile_flops": tile_flops,
        "baseline_rss": baseline,
        "prediction_peak_rss": _rss_high_water_mark() if reset else None,
        "peak_rss": _peak_rss_bytes(),
        "source": source,
    }


def _run_child(job: dict) -> dict:
    command = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(job)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
    raise RuntimeError(f"benchmark child {job} failed (exit {done.returncode}):\n{tail}")


# Full-size arrays a whole-photograph prediction must hold, in bytes per pixel:
# the photograph (uint8 RGB), its preprocessed copy (uint8 RGB), the FOV mask
# (uint8) and the float32 output map (predict_tiled keeps no weight sum and no
# float copies of the photograph).
FULL_SIZE_BYTES_PER_PIXEL = 3 + 3 + 1 + 4


def tiled_prediction(settings: Settings, peak: dict, progress=None) -> dict:
    """Whole-photograph prediction: TiledSegmenter vs the authors' 160-px grid; memory."""
    rows = []
    jobs = [("auto", precision, settings.photo_shape) for precision in settings.precisions]
    jobs.append(("tiled", "float32", settings.photo_shape))
    if settings.naive:
        jobs.append(("naive", "float32", settings.photo_shape))
    if settings.memory_check:
        jobs.append(("auto", "float32", settings.large_photo_shape))
    best_peak = max(v for v in peak["peak"].values() if v)
    for index, (mode, precision, shape) in enumerate(jobs):
        tile = settings.naive_patch if mode == "naive" else settings.tile
        job = {
            "mode": mode,
            "precision": precision,
            "shape": list(shape),
            "tile": tile,
            "quick": settings.quick,
        }
        load = load_average()
        result = _run_child(job)
        pixels = shape[0] * shape[1]
        flops_per_pixel = result["tile_flops"] / tile**2
        done_flops = flops_per_pixel * result["pixels"]
        achieved = done_flops / result["seconds"] / 1e9
        # The target: seconds / (the model's FLOPs for the whole photograph / the
        # machine's best measured peak, whichever precision has it).
        ideal_seconds = flops_per_pixel * pixels / (best_peak * 1e9)
        prediction_peak = result["prediction_peak_rss"] or result["peak_rss"]
        growth = prediction_peak - result["baseline_rss"]
        rows.append(
            {
                "mode": mode,
                "precision": precision,
                "shape": shape,
                "tile": tile,
                "tiles": result["tiles"],
                "tile_shapes": result["tile_shapes"],
                "plan": result.get("plan"),
                "seconds": result["seconds"],
                "photo_tflop": flops_per_pixel * pixels / 1e12,
                "overhead": result["pixels"] / pixels,
                "vs_ideal": result["seconds"] / ideal_seconds,
                "gflops": achieved,
                "peak_percent": percent(achieved, peak_for(peak, precision)),
                "peak_rss_mb": result["peak_rss"] / 2**20,
                "prediction_peak_rss_mb": prediction_peak / 2**20,
                "growth_mb": growth / 2**20,
                "beyond_mb": (growth - FULL_SIZE_BYTES_PER_PIXEL * pixels) / 2**20,
                "source": result["source"],
                "load": load,
            }
        )
        print(
            f"tiled_prediction {mode} {precision} {shape[1]}x{shape[0]}: "
            f"{result['seconds']:.1f} s, {achieved:.1f} GFLOP/s",
            flush=True,
        )
        if progress and index + 1 < len(jobs):
            pending = [f"{m} {p} {s[1]}x{s[0]}" for m, p, s in jobs[index + 1 :]]
            progress({"settings": {"tile": settings.tile}, "rows": rows, "pending": pending})
    return {
        "settings": {"tile": settings.tile, "naive_patch": settings.naive_patch},
        "best_peak": best_peak,
        "rows": rows,
    }


BENCHMARKS = {
    "pretrain_throughput": pretrain_throughput,
    "tiled_prediction": tiled_prediction,
    "local_global_prediction": local_global_prediction,
    "multiworker_throughput": multiworker_throughput,
    "idrid_transfer": idrid_transfer,
    "tile_aupr": tile_aupr,
    "idrid_real": idrid_real,
}
# Run by `make bench` without --only; the real-data experiments (idrid_transfer, about an hour
# of training; tile_aupr, about 35 minutes; idrid_real, half an hour a row) only on request.
ON_REQUEST = ("idrid_transfer", "tile_aupr", "idrid_real")
DEFAULT_BENCHMARKS = [name for name in BENCHMARKS if name not in ON_REQUEST]


# --------------------------------------------------------------------------- Markdown


def render_peak(peak: dict, machine: dict, settings: Settings) -> str:
    batch, height, width, channels = settings.conv_shape
    size = settings.matmul_size
    rows = []
    for name, label in (
        ("conv", f"3x3 conv {batch}x{height}x{width}x{channels} -> {channels}"),
        ("matmul", f"matmul {size}^3"),
    ):
        f32, bf16 = peak[name]["float32"], peak[name]["bfloat16"]
        ratio = bf16 / f32 if f32 and bf16 else None
        rows.append([label, fmt(f32), fmt(bf16), fmt(ratio, 2)])
    f32, bf16 = peak["peak"]["float32"], peak["peak"]["bfloat16"]
    rows.append(["**peak** (max of the two)", fmt(f32), fmt(bf16), fmt(bf16 / f32, 2)])
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    return "\n\n".join(
        [
            "## Machine peak",
            run_line(machine, settings),
            f"CPU flags: {flags}. GPUs visible: {machine['gpus']}. "
            f"`--precision auto` resolves to **{machine['auto_precision']}** here.",
            table(["kernel", "float32 GFLOP/s", "bfloat16 GFLOP/s", "bf16 / fp32"], rows),
            f"Best of {settings.peak_repeats} timed calls after one warm-up call. "
            f"Load average after: {peak['load']}.",
        ]
    )


def render_pretrain(result: dict, machine: dict, settings: Settings) -> str:
    s = result["settings"]
    title = "## pretrain_throughput"
    if settings.tag:
        title += f" ({settings.tag})"
    elif section_key("pretrain_throughput", settings) != "pretrain_throughput":
        title += f" at {s['image_size']} px, batch {s['batch_size']}"
    rows_by_key = {(r["model"], r["precision"]): r for r in result["rows"]}
    rows = []
    for row in result["rows"]:
        base = rows_by_key.get((row["model"], "float32"))
        twin = rows_by_key.get((KERAS_TWIN.get(row["model"]), row["precision"]))
        rows.append(
            [
                PRETRAIN_MODELS[row["model"]][0],
                row["precision"],
                fmt(row["forward_gflop"]),
                fmt(step_gflop(row["forward_gflop"], s["batch_size"])),
                fmt(row["step_seconds"], 2),
                f"{row['step_spread'][0]:.2f}-{row['step_spread'][1]:.2f}",
                fmt(row["images_per_second"], 3),
                fmt(row["gflops"]),
                fmt(conv_share(row, {"conv": result.get("conv_peak", {})})),
                fmt(row["images_per_second"] / base["images_per_second"], 2) if base else "n/a",
                fmt(row["images_per_second"] / twin["images_per_second"], 2) if twin else "-",
                row["load"],
            ]
        )
    header = [
        "model",
        "precision",
        "forward GFLOP/image",
        "GFLOP/step",
        "step s (median)",
        "step s (min-max)",
        "images/s",
        "GFLOP/s",
        "% of conv peak",
        "vs float32",
        "vs keras.applications",
        "load",
    ]
    return "\n\n".join(
        [
            title,
            run_line(machine, settings),
            f"Training steps (`train_on_batch`, Adam, binary cross-entropy, compiled as "
            f"`rmib.training` compiles) at {s['image_size']} px, batch {s['batch_size']}, "
            f"random images; {s['warmup_steps']} warm-up steps excluded, median of "
            f"{s['timed_steps']} timed steps. The models of one family (an rmib backbone "
            "with and without CBAM, its keras.applications twin, every precision) are "
            "built together and take their timed steps in turns, so load changes hit "
            "them alike; the load column is the load average when the family started. "
            "GFLOP/step = 3 x forward FLOPs x batch (a multiply-add is 2 FLOP); GFLOP/s = "
            "GFLOP/step / step time; % of conv peak is against the 3x3-convolution peak of "
            "the same precision (bfloat16 for mixed_bfloat16) measured in this run. "
            '"vs keras.applications" divides by the plain '
            "keras.applications model (weights=None, same head) in the same precision.",
            table(header, rows),
            render_pretrain_summary(result),
            peak_line(result),
            f"`--precision auto` picks **{result['auto_precision']}** on this machine "
            f"(native bfloat16 CPU support: {'yes' if result['cpu_bfloat16'] else 'no'}).",
            NOISE_NOTE,
        ]
    )


def render_pretrain_summary(result: dict) -> str:
    """Issue #19's table: per model, both precisions, the speed-up against the peak ratio."""
    peak = {"conv": result.get("conv_peak", {})}
    ratio = conv_peak_ratio(peak)
    rows = [
        [
            PRETRAIN_MODELS[row["model"]][0],
            fmt(row["float32_seconds"], 2),
            fmt(row["bfloat16_seconds"], 2),
            fmt(row["speedup"], 2),
            fmt(row["speedup_of_peak_ratio"], 0),
            fmt(row["float32_share"], 0),
            fmt(row["bfloat16_share"], 0),
            fmt(row["cbam_added_float32"], 0),
            fmt(row["cbam_added_bfloat16"], 0),
        ]
        for row in summary_rows(result["rows"], peak)
    ]
    header = [
        "model",
        "float32 s/step",
        "bf16 s/step",
        "bf16 / fp32",
        "% of the peak ratio",
        "% of fp32 conv peak",
        "% of bf16 conv peak",
        "CBAM adds, fp32 %",
        "CBAM adds, bf16 %",
    ]
    return (
        f"Summary. The machine's 3x3-conv peak ratio bf16 / fp32 in this run: "
        f"**{fmt(ratio, 2)}x**. Issue #19's targets: >= 50 % of each precision's conv peak, "
        "bf16 / fp32 >= 80 % of the peak ratio, CBAM adding <= 15 %.\n\n" + table(header, rows)
    )


def render_tiled(result: dict, machine: dict, settings: Settings) -> str:
    rows, memory = [], []
    for row in result["rows"]:
        height, width = row["shape"]
        mode = row.get("mode", "tiled")
        if mode == "auto":
            label = f"TiledSegmenter auto: {', '.join(row.get('tile_shapes', []))} tiles, halo 64"
        elif mode == "tiled":
            label = f"TiledSegmenter, fixed tile {row['tile']}, overlap 0.125"
        else:
            label = f"authors' grid: {row['tile']} px, 1 patch per model.predict"
        rows.append(
            [
                label,
                row["precision"],
                f"{width}x{height}",
                row["tiles"],
                fmt(row["seconds"]),
                fmt(row["photo_tflop"], 2),
                fmt(row["overhead"], 2),
                fmt(row["gflops"]),
                fmt(row["peak_percent"]),
                fmt(row.get("vs_ideal"), 2),
                fmt(row["peak_rss_mb"], 0),
                row["load"],
            ]
        )
        if mode in ("tiled", "auto") and row["precision"] == "float32":
            memory.append(
                [
                    "auto" if mode == "auto" else f"fixed {row['tile']}",
                    f"{width}x{height}",
                    fmt(height * width / 1e6, 1),
                    fmt(row["prediction_peak_rss_mb"], 0),
                    fmt(row["growth_mb"], 0),
                    fmt(FULL_SIZE_BYTES_PER_PIXEL * height * width / 2**20, 0),
                    fmt(row["beyond_mb"], 0),
                ]
            )
    header = [
        "method",
        "precision",
        "photograph",
        "tiles",
        "s / image",
        "model TFLOP for the photograph",
        "tiling factor",
        "GFLOP/s",
        "% of peak",
        "x ideal",
        "process peak RSS MB",
        "load",
    ]
    sources = sorted({row["source"] for row in result["rows"]})
    parts = [
        "## tiled_prediction",
        run_line(machine, settings),
        "Whole-photograph prediction with the VGG16-CBAM encoder-decoder "
        '(`build_encoder_decoder("vgg16", cbam=True)`, built under the precision policy) '
        "through `rmib.methods.encoder_decoder.segmenter.TiledSegmenter` (CLAHE, FOV mask), each run in a fresh "
        "child process after one warm-up tile: **auto** (the default of `rmib predict` for "
        "new runs) plans the fewest, most even tiles of at most 1024x1024 pixels over the "
        "field of view's bounding box, overlapping by 2 x 64 px and blended with the ramp "
        "window, one tile per call; **fixed** = square tiles overlapping by 0.125 over the "
        "whole photograph, Gaussian window, batch 2 (the earlier default, and the tiling of "
        f"an exported `segment_image`). Photograph: {'; '.join(sources)}. "
        "Model TFLOP for the photograph = forward FLOPs per pixel x its pixels; the tiling "
        "factor = pixels actually predicted (tiles x tile area, overlap included, tiles "
        "outside the field of view skipped) / photograph pixels; GFLOP/s counts the "
        "FLOPs actually run; **x ideal** = seconds / (model FLOPs for the whole photograph / "
        "the best peak measured in this run, "
        f"{fmt(result.get('best_peak'))} GFLOP/s) — the issue's target is 1.2. "
        "The authors' approach (same model in float32, same CLAHE) "
        "predicts every patch of a non-overlapping grid, one `model.predict` call each.",
        table(header, rows),
        peak_line(result),
    ]
    if memory:
        parts += [
            "### Memory check",
            "Peak RSS of the child while it predicts the photograph (VmHWM reset after "
            "the model was built and warmed up), its growth over the RSS at that moment, "
            "and what is left of that growth beyond the "
            f"photograph-sized arrays ({FULL_SIZE_BYTES_PER_PIXEL} bytes/pixel = 3 + 3 + 1 + 4: "
            "the photograph and its preprocessed copy, uint8 RGB; the FOV mask, uint8; the "
            "float32 output map). With tiling, what is left should not grow with the "
            "photograph.",
            table(
                [
                    "tiles",
                    "photograph",
                    "Mpixel",
                    "peak RSS during prediction MB",
                    "growth MB",
                    "photo-sized arrays MB",
                    "beyond MB",
                ],
                memory,
            ),
        ]
    parts.append(NOISE_NOTE)
    return "\n\n".join(parts)


RENDERERS = {
    "pretrain_throughput": render_pretrain,
    "tiled_prediction": render_tiled,
    "local_global_prediction": render_local_global,
    "multiworker_throughput": render_multiworker,
    "idrid_transfer": render_idrid_transfer,
    "tile_aupr": render_tile_aupr,
    "idrid_real": render_idrid_real,
}

HEADER = """# rmib benchmarks

Generated by `make bench` (`python -m benchmarks.run --out benchmarks/BENCHMARKS.md`);
`--only NAME` re-runs one benchmark; every run keeps the sections it does not re-measure.

## Method

- **FLOPs** (DESIGN.md "How performance is counted"): 2 x the multiply-adds of every
  convolution (Conv, ConvTranspose, DepthwiseConv, SeparableConv) and Dense call of a
  model for one input, counted analytically from the layer shapes by
  `benchmarks/flops.py::model_flops` (nested models such as the classifier's
  "backbone" and CBAM's sublayers included; biases, batch norms, activations and
  pooling not counted). A training step counts 3 x forward.
- **Peak**: measured in the same run, best of a few calls of a 3x3 convolution on an
  8x128x128x256 tensor (256 output channels) and of a 4096^3 matmul, in float32 and
  bfloat16. **Efficiency** = achieved GFLOP/s / peak of the same precision.
- **Timing**: wall clock (`time.perf_counter`), warm-up (tracing) excluded. Memory
  of whole-photograph prediction: the child process's `ru_maxrss`, and its peak RSS
  while predicting (Linux VmHWM, reset after the model is built and warmed up).
- **Noise**: pretrain_throughput builds the models of a family together and times
  their steps in turns, so its ratios hold under changing load; tiled_prediction
  runs one child process after another, so its ratios are exposed to load changes
  between runs. Each row shows the load average (1/5/15 min) when it started. Sections may come from separate
  `--only` runs (each states its own date, sizes, step counts and peak).
- **Precision**: `--precision auto` picks mixed_bfloat16 only on CPUs with native
  bfloat16 maths (AMX or AVX512-BF16); elsewhere bfloat16 is converted in software
  and mixed_bfloat16 is expected to be slower than float32. The peak section lists
  the CPU flags of the machine measured."""


def _sections(text: str) -> dict[str, str]:
    found = re.findall(r"<!-- bench:(\w+) -->\n(.*?)\n<!-- /bench:\1 -->", text, re.S)
    return dict(found)


def read_sections(path: Path) -> dict[str, str]:
    """The benchmark sections of an existing BENCHMARKS.md, by key."""
    return _sections(path.read_text()) if path.is_file() else {}


def _order(key: str) -> tuple:
    order = ["peak", *BENCHMARKS]
    base = next((i for i, name in enumerate(order) if key.startswith(name)), len(order))
    return (base, key != order[base] if base < len(order) else True, key)


def write_markdown(path: Path, sections: dict[str, str]) -> None:
    """(Re)write `path`: the method header, then `sections` in benchmark order."""
    from rmib.io import atomic_write

    parts = [HEADER]
    for key in sorted(sections, key=_order):
        parts.append(f"<!-- bench:{key} -->\n{sections[key]}\n<!-- /bench:{key} -->")
    with atomic_write(path) as handle:
        handle.write("\n\n".join(parts) + "\n")


def merge_sections(path: Path, sections: dict[str, str]) -> None:
    """Write `sections` into `path`, keeping every section this run does not re-measure.

    The file is re-read each time (another run may have written meanwhile), so
    `make bench` keeps the real-data sections it does not run and `--only`
    keeps the rest.
    """
    current = read_sections(path)
    current.update(sections)
    write_markdown(path, current)


def section_key(name: str, settings: Settings) -> str:
    """Runs at non-default sizes get their own section beside the default one."""
    default = Settings()
    if settings.tag:
        return f"{name}_{settings.tag}"
    if name == "idrid_real" and not settings.quick and settings.idrid_minutes != 30.0:
        return f"{name}_screening_{settings.idrid_minutes:g}min".replace(".", "_")
    if name == "pretrain_throughput" and not settings.quick:
        if (settings.image_size, settings.batch_size) != (default.image_size, default.batch_size):
            return f"{name}_{settings.image_size}px_batch{settings.batch_size}"
    return name


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to (re)write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable); the machine peak is always measured",
    )
    parser.add_argument("--models", help=f"comma list of {', '.join(PRETRAIN_MODELS)}")
    parser.add_argument("--precisions", help=f"comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--image-size", type=int, help="pretrain_throughput image side")
    parser.add_argument("--batch-size", type=int, help="pretrain_throughput batch size")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--timed-steps", type=int)
    parser.add_argument("--no-naive", action="store_true", help="skip the authors' 160-px grid")
    parser.add_argument(
        "--no-memory-check", action="store_true", help="skip the 6000x4000 photograph"
    )
    parser.add_argument(
        "--tag", help="keep this run's sections apart from the default ones (letters, digits, _)"
    )
    parser.add_argument(
        "--rows", help="idrid_real: comma list of rows to run (default: all not yet measured)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="idrid_real: training minutes per row [30]; others are screening rows, kept "
        "out of benchmarks/idrid_real.json",
    )
    parser.add_argument(
        "--taskset", type=int, metavar="CORE", help="idrid_real: pin each row to this CPU core"
    )
    parser.add_argument(
        "--lever",
        help="idrid_real screening: apply this lever's recipe overrides (benchmarks.idrid_real."
        "LEVERS) to the rows; needs --minutes",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args) -> Settings:
    settings = Settings.quick_settings() if args.quick else Settings()
    changes = {}
    if args.models:
        names = tuple(n.strip() for n in args.models.split(",") if n.strip())
        unknown = [n for n in names if n not in PRETRAIN_MODELS]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; valid: {', '.join(PRETRAIN_MODELS)}")
        changes["models"] = names
    if args.precisions:
        names = tuple(n.strip() for n in args.precisions.split(",") if n.strip())
        if any(n not in PRECISIONS for n in names):
            raise SystemExit(f"precisions must be among {', '.join(PRECISIONS)}, got {names}")
        changes["precisions"] = names
    if args.image_size:
        changes["image_size"] = args.image_size
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.warmup_steps is not None:
        changes["warmup_steps"] = args.warmup_steps
    if args.timed_steps is not None:
        changes["timed_steps"] = max(1, args.timed_steps)
    if args.tag:
        if not re.fullmatch(r"\w+", args.tag):
            raise SystemExit(f"--tag takes letters, digits and _, got {args.tag!r}")
        changes["tag"] = args.tag
    if args.no_naive:
        changes["naive"] = False
    if args.no_memory_check:
        changes["memory_check"] = False
    if args.rows:
        changes["idrid_rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    if args.minutes is not None:
        if args.minutes <= 0:
            raise SystemExit(f"--minutes must be positive, got {args.minutes}")
        changes["idrid_minutes"] = args.minutes
    if args.taskset is not None:
        changes["taskset"] = args.taskset
    if args.lever:
        changes["idrid_lever"] = args.lever
    return dataclasses.replace(settings, **changes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child_tiled(json.loads(args.child))), flush=True)
        return {}
    settings = settings_from(args)
    names = args.only or DEFAULT_BENCHMARKS
    machine = machine_description()
    print(f"machine: {machine['cpu']}, auto precision {machine['auto_precision']}", flush=True)
    peak = measure_peak(settings)
    print(f"peak GFLOP/s: {peak['peak']}", flush=True)
    sections = {"peak": render_peak(peak, machine, settings)}
    results = {"machine": machine, "peak": peak}

    def save():
        if args.out:
            merge_sections(args.out, sections)

    save()
    for name in names:

        def progress(partial, name=name):
            partial["peak_used"] = peak["peak"]
            key = section_key(name, settings)
            sections[key] = RENDERERS[name](partial, machine, settings)
            save()

        result = BENCHMARKS[name](settings, peak, progress=progress)
        progress(result)
        results[name] = result
    if not args.out:
        print("\n\n".join(sections.values()))
    return results


if __name__ == "__main__":
    main()
