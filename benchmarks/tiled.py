"""`tiled_prediction`: whole-photograph prediction with TiledSegmenter vs the authors'
160-px grid, and its memory.

Each measurement runs in a child process (`python -m benchmarks.run --child JOB`,
`child_tiled`) so that each one's peak resident memory is its own.

    python -m benchmarks.run --only tiled_prediction
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    NOISE_NOTE,
    PROJECT_ROOT,
    fmt,
    load_average,
    peak_for,
    peak_line,
    percent,
    photograph,
    run_line,
    table,
)
from benchmarks.settings import Settings


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
