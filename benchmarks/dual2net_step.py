"""Peak memory and time of one Dual2Net training step, as the recipe trains it.

One configuration per process (peak RSS is the process's): ResNet50 Dual2Net
with the PPM head, both branches, the DSM Dice loss, SGD with coupled weight
decay and the poly schedule (segment/idrid_ex_dual2net.toml's `[train]`), a
batch of `--batch` photographs per branch (2 in the recipe: 4 through the
shared trunk every step), float32, random weights (timing and memory do not
depend on them). A thread ends the process (exit 3) as soon as its resident
memory passes `--max-rss-gb`, so a size that does not fit cannot push the
machine out of memory.

    taskset -c 1 python -m benchmarks.dual2net_step --size 320 480 --output-stride 8

Prints one JSON line: peak RSS (VmHWM, MB), seconds of the first step (tracing
included) and of each later step, and the analytic FLOPs of a training step
(`benchmarks.flops`).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _watch_memory(limit_kb, interval=0.2):
    def watch():
        while True:
            rss = _status_kb("VmRSS")
            if rss > limit_kb:
                print(json.dumps({"aborted": f"RSS {rss // 1024} MB over the limit"}), flush=True)
                os._exit(3)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True).start()


def _batch(rng, batch, height, width):
    import numpy as np

    x = rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32)
    y = np.zeros((batch, height, width, 1), np.float32)
    for image in y:  # a few square "exudates" of several sizes
        for _ in range(12):
            side = int(rng.integers(2, max(3, height // 16)))
            top, left = rng.integers(0, height - side), rng.integers(0, width - side)
            image[top : top + side, left : left + side] = 1.0
    return x, y


def step_flops(model, height, width):
    """Analytic FLOPs of one training step of `model`, per image (`benchmarks.flops`)."""
    import keras

    from benchmarks.flops import TRAIN_STEP_FACTOR, model_flops

    trunk = model_flops(model.trunk, (height, width, 3))
    inference = model_flops(model.inference_model(), (height, width, 3))
    branch = (inference - trunk) // 2
    aux_shape = model.trunk(keras.Input((height, width, 3)))["aux"].shape[1:]
    aux = model_flops(model.aux_heads[0], tuple(int(d) for d in aux_shape))
    # Every image goes through the trunk, an aux head and its own branch only.
    return TRAIN_STEP_FACTOR * (trunk + branch + aux)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(960, 1440), metavar=("H", "W"))
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="photographs per branch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--max-rss-gb", type=float, default=12.0)
    args = parser.parse_args(argv)
    _watch_memory(int(args.max_rss_gb * 1024 * 1024))

    import keras
    import numpy as np

    from rmib.config import TrainConfig
    from rmib.losses import sample_rebalanced_pixels
    from rmib.methods.dual2net.model import build_dual2net
    from rmib.training import make_optimizer

    keras.mixed_precision.set_global_policy("float32")
    height, width = args.size
    started = time.perf_counter()
    model = build_dual2net("resnet50", output_stride=args.output_stride)
    cfg = TrainConfig(
        optimizer="sgd",
        learning_rate=0.03,
        momentum=0.9,
        weight_decay=5e-4,
        weight_decay_mode="coupled",
        lr_schedule="poly",
        poly_power=0.9,
        epochs=40,
        batch_size=args.batch,
    )
    model.compile(optimizer=make_optimizer(cfg, steps_per_epoch=27))
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    x_large, y_large = _batch(rng, args.batch, height, width)
    x_small, y_small = _batch(rng, args.batch, height, width)
    counts = np.asarray(sample_rebalanced_pixels(y_small, 0.5, seed=1), np.float32)
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        logs = model.train_on_batch(
            (x_large, x_small), (y_large, y_small, counts), return_dict=True
        )
        times.append(time.perf_counter() - started)
    result = {
        "size": [height, width],
        "output_stride": args.output_stride,
        "batch_per_branch": args.batch,
        "precision": "float32",
        "peak_rss_mb": round(_status_kb("VmHWM") / 1024),
        "build_s": round(build_s, 1),
        "first_step_s": round(times[0], 1),
        "step_s": [round(t, 1) for t in times[1:]],
        "loss": round(float(logs["loss"]), 4),
        "train_step_gflop": round(2 * args.batch * step_flops(model, height, width) / 1e9),
        "parameters_m": round(model.count_params() / 1e6, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
