"""The machine a run measures, and its peak GFLOP/s (DESIGN.md "How performance is counted").

Every run of `python -m benchmarks.run` measures the peak first: a 3x3
convolution on an 8x128x128x256 tensor and a 4096^3 matmul, float32 and
bfloat16; each benchmark's "% of peak" is against it.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from pathlib import Path

from benchmarks.common import fmt, load_average, run_line, table
from benchmarks.settings import Settings


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
