"""`multiworker_throughput`: one training job as one process and as two workers.

The same small training job, the stage-1 classifier `rmib pretrain` trains
(`build_classifier("resnet50")` at 128 px, binary cross-entropy, Adam, the
pretrain metrics; random images), runs through `rmib.training.fit`

- (a) in one process with the default strategy (Keras' `model.fit`), and
- (b) as two worker processes on 127.0.0.1 with MultiWorkerMirroredStrategy
  (TF_CONFIG with free ports picked at run time; the runner's own
  `strategy.run` loop, data sharded with `AutoShardPolicy.DATA`),

with the same global batch (8 images: 8 per replica in (a), 4 per replica
in (b)). Each process times its own training steps (`on_train_batch_begin`
to `on_train_batch_end`, the step's loss read back, so the step is done),
the first `warmup_steps` excluded (tracing, the first collective); the
parent times each process from launch to exit. Every process is a fresh
child, so both runs pay the same imports and start-up.

On one machine the two workers share its cores: the ratio of (b) to (a)
measures what distribution costs (the gradient all-reduce over loopback,
the per-step synchronisation, the duplicated input and optimizer work),
not a speed-up.

    python -m benchmarks.run --only multiworker_throughput --out benchmarks/BENCHMARKS.md

The batch size is stated as the global batch. `TrainConfig.batch_size` is
given the per-replica batch (global / replicas) and the data is a
`tf.data.Dataset` batched by the global batch with explicit steps, so the
job is the same whether the runner reads `batch_size` as the global or the
per-replica batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    NOISE_NOTE,
    fmt,
    load_average,
    peak_for,
    peak_line,
    percent,
    run_line,
    table,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
# The job of a full run and of a `--quick` smoke test.
FULL_JOB = {"model": "classifier", "backbone": "resnet50", "image_size": 128, "global_batch": 8}
QUICK_JOB = {"model": "tiny", "backbone": None, "image_size": 32, "global_batch": 4}
TIMEOUT = {"full": 3600, "quick": 600}  # seconds per process
LEARNING_RATE = 1e-4  # rmib pretrain's default


def job_for(settings) -> dict:
    """The training job of a run: model, image size, global batch, step counts."""
    job = dict(QUICK_JOB if settings.quick else FULL_JOB)
    job["warmup_steps"] = max(1, int(settings.warmup_steps))
    job["timed_steps"] = max(1, int(settings.timed_steps))
    return job


def model_label(job: dict) -> str:
    if job["model"] == "classifier":
        return f"rmib classifier `build_classifier({job['backbone']!r})` (as `rmib pretrain`)"
    return "tiny 2-conv classifier (smoke test)"


# --------------------------------------------------------------------------- child


def _tiny_classifier(image_size: int):
    import keras

    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="tiny_classifier")


def child_run(job: dict) -> dict:
    """Train `job` in this process (one worker of it under "multiworker"); its timings.

    job: FULL_JOB / QUICK_JOB keys, plus "strategy" ("default" or
    "multiworker", TF_CONFIG set by the parent), "warmup_steps",
    "timed_steps", "run_dir" and "flops" (also count the model's FLOPs).
    """
    from rmib import training  # creates no TF op: the strategy comes first

    strategy = training.get_strategy(job["strategy"])

    import keras
    import numpy as np
    import tensorflow as tf

    from rmib.config import TrainConfig

    replicas = strategy.num_replicas_in_sync
    global_batch = int(job["global_batch"])
    if global_batch % replicas:
        raise ValueError(f"global batch {global_batch} is not a multiple of {replicas} replicas")
    per_replica = global_batch // replicas
    steps = job["warmup_steps"] + job["timed_steps"]
    size = job["image_size"]
    # The same seeded data in every worker: each keeps its part of every global batch.
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (steps * global_batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 2, (steps * global_batch, 1)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, labels))
    data = data.batch(global_batch, drop_remainder=True)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(np.asarray((logs or {}).get("loss", 0.0)))  # the step has finished
            self.seconds.append(time.perf_counter() - self.begin)

    def make_model():
        if job["model"] == "classifier":
            from rmib.models import build_classifier

            return build_classifier(job["backbone"], image_size=size)
        return _tiny_classifier(size)

    config = TrainConfig(
        epochs=1,
        batch_size=per_replica,  # unused with a batched dataset and explicit steps
        learning_rate=LEARNING_RATE,
        monitor="loss",
        restore_best=False,
        precision="float32",
        strategy=job["strategy"],
        seed=0,
        tensorboard=False,
    )
    timer = StepTimer()
    start = time.perf_counter()
    model, history = training.fit(
        make_model,
        data,
        config=config,
        run_dir=job["run_dir"],
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.Precision(name="precision"),
        ],
        steps_per_epoch=steps,
        extra_callbacks=[timer],
        save_final=False,
        verbose=0,
    )
    fit_seconds = time.perf_counter() - start
    result = {
        "replicas": replicas,
        "chief": training.is_chief(strategy),
        "global_batch": global_batch,
        "per_replica_batch": per_replica,
        "step_seconds": timer.seconds,
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "fit_seconds": fit_seconds,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "loss": float(history["loss"][-1]),
    }
    if job.get("flops"):
        from benchmarks.flops import model_flops

        result["forward_flops"] = int(model_flops(model, (size, size, 3)))
    return result


# --------------------------------------------------------------------------- parent


def run_processes(jobs: list[tuple[dict, dict | None]], tmp: Path, timeout: float):
    """Start one child per (job, TF_CONFIG) at once; wait for all of them.

    Returns:
        (results, seconds): each child's `child_run` result, and the wall
        time from the first launch until the last child exited.

    Raises:
        RuntimeError: a child failed or ran out of time (the others are
            stopped: a lone worker would wait for its peer forever).
    """
    from rmib.training.local_cluster import run_workers, worker_environment

    commands, environments, logs, result_paths = [], [], [], []
    for index, (job, tf_config) in enumerate(jobs):
        result_path = tmp / f"result_{index}.json"
        command = [sys.executable, "-m", "benchmarks.multiworker", "--child", json.dumps(job)]
        commands.append([*command, "--result", str(result_path)])
        environments.append(worker_environment(tf_config))
        logs.append(tmp / f"log_{index}.txt")
        result_paths.append(result_path)
    seconds = run_workers(commands, environments, logs, timeout, cwd=PROJECT_ROOT)
    return [json.loads(path.read_text()) for path in result_paths], seconds


def _row(mode: str, results: list[dict], seconds: float, load: str, job: dict) -> dict:
    """One table row from the result(s) of one run; the chief's steps are the run's."""
    chief = next(r for r in results if r["chief"])
    for result in results:
        expected = job["warmup_steps"] + job["timed_steps"]
        if len(result["step_seconds"]) != expected or result["iterations"] != expected:
            raise RuntimeError(
                f"{mode}: a process ran {len(result['step_seconds'])} steps "
                f"({result['iterations']} optimizer updates), expected {expected}"
            )
    timed = chief["step_seconds"][job["warmup_steps"] :]
    median = statistics.median(timed)
    return {
        "mode": mode,
        "processes": len(results),
        "replicas": chief["replicas"],
        "global_batch": chief["global_batch"],
        "per_replica_batch": chief["per_replica_batch"],
        "step_seconds": median,
        "step_spread": (min(timed), max(timed)),
        "worker_step_seconds": [
            statistics.median(r["step_seconds"][job["warmup_steps"] :]) for r in results
        ],
        "images_per_second": chief["global_batch"] / median,
        "fit_seconds": max(r["fit_seconds"] for r in results),
        "process_seconds": seconds,
        "loss": chief["loss"],
        "load": load,
    }


def multiworker_throughput(settings, peak: dict, progress=None) -> dict:
    """Training images/s of one job: one process vs two workers on 127.0.0.1.

    Args:
        settings: `benchmarks.settings.Settings` (quick, warmup_steps, timed_steps).
        peak: `benchmarks.peak.measure_peak`'s result.
        progress: called with the partial result after the single-process run.

    Returns:
        {"settings": the job, "model": {"label", "params", "trainable_params",
        "gradient_mb", "forward_gflop"}, "rows": [single, two workers],
        "ratio": two-worker images/s / single-process images/s (None until
        both ran), "overhead_seconds": step-time difference, "pending"}.
    """
    from rmib.training.local_cluster import local_cluster

    job = job_for(settings)
    timeout = TIMEOUT["quick" if settings.quick else "full"]
    rows: list[dict] = []
    model: dict = {"label": model_label(job)}

    def result(pending=()):
        single = next((r for r in rows if r["mode"] == "single"), None)
        multi = next((r for r in rows if r["mode"] == "multi"), None)
        both = single is not None and multi is not None
        return {
            "settings": {**job, "workers": WORKERS},
            "model": model,
            "rows": rows,
            "ratio": multi["images_per_second"] / single["images_per_second"] if both else None,
            "overhead_seconds": multi["step_seconds"] - single["step_seconds"] if both else None,
            "pending": list(pending),
        }

    def add(row, forward_flops):
        if forward_flops:
            achieved = 3 * forward_flops * row["global_batch"] / row["step_seconds"] / 1e9
            row["gflops"] = achieved
            row["peak_percent"] = percent(achieved, peak_for(peak, "float32"))
        else:
            row["gflops"] = row["peak_percent"] = None
        rows.append(row)
        print(
            f"multiworker_throughput {row['mode']}: {row['images_per_second']:.3f} images/s "
            f"(step {row['step_seconds']:.2f} s, process wall {row['process_seconds']:.0f} s)",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="rmib-bench-multiworker-") as name:
        tmp = Path(name)
        # (a) one process, default strategy.
        single_dir = tmp / "single"
        single_dir.mkdir()
        single_job = {**job, "strategy": "default", "run_dir": str(single_dir / "run")}
        load = load_average()
        (single,), seconds = run_processes(
            [({**single_job, "flops": True}, None)], single_dir, timeout
        )
        flops = single.get("forward_flops")
        model.update(
            params=single["params"],
            trainable_params=single["trainable_params"],
            gradient_mb=single["trainable_params"] * 4 / 2**20,
            forward_gflop=flops / 1e9 if flops else None,
        )
        add(_row("single", [single], seconds, load, job), flops)
        if progress:
            progress(result([f"{WORKERS} workers"]))

        # (b) two worker processes on 127.0.0.1, MultiWorkerMirroredStrategy.
        multi_dir = tmp / "multi"
        multi_dir.mkdir()
        worker_job = {**job, "strategy": "multiworker", "run_dir": str(multi_dir / "run")}
        jobs = [(worker_job, tf_config) for tf_config in local_cluster(WORKERS)]
        load = load_average()
        results, seconds = run_processes(jobs, multi_dir, timeout)
        if [r["replicas"] for r in results] != [WORKERS] * WORKERS:
            raise RuntimeError(f"the workers formed no {WORKERS}-replica cluster: {results}")
        add(_row("multi", results, seconds, load, job), flops)
    final = result()
    print(f"multiworker_throughput: two workers / one process = {final['ratio']:.2f}", flush=True)
    return final


# --------------------------------------------------------------------------- Markdown


def render_multiworker(result: dict, machine: dict, settings) -> str:
    """The Markdown section of `multiworker_throughput`."""
    s = result["settings"]
    m = result["model"]
    labels = {
        "single": "one process, default strategy (`model.fit`)",
        "multi": f"{s['workers']} workers on 127.0.0.1, MultiWorkerMirroredStrategy "
        "(runner's `strategy.run` loop)",
    }
    rows = []
    for row in result["rows"]:
        rows.append(
            [
                labels[row["mode"]],
                f"{row['processes']} x {row['replicas'] // row['processes']}",
                row["global_batch"],
                row["per_replica_batch"],
                fmt(row["images_per_second"], 3),
                fmt(row["step_seconds"], 3),
                f"{row['step_spread'][0]:.3f}-{row['step_spread'][1]:.3f}",
                ", ".join(f"{x:.3f}" for x in row["worker_step_seconds"]),
                fmt(row["gflops"]),
                fmt(row["peak_percent"]),
                fmt(row["fit_seconds"], 1),
                fmt(row["process_seconds"], 1),
                row["load"],
            ]
        )
    header = [
        "run",
        "processes x replicas each",
        "global batch",
        "per-replica batch",
        "images/s",
        "step s (median)",
        "step s (min-max)",
        "step s (median) per process",
        "GFLOP/s",
        "% of peak",
        "fit wall s",
        "process wall s",
        "load",
    ]
    size = s["image_size"]
    gradient = _megabytes(m.get("gradient_mb"))
    params = f"{m['params']:,}" if m.get("params") else "n/a"
    parts = [
        "## multiworker_throughput",
        run_line(machine, settings),
        f"One training job, {m['label']} at {size}x{size} px (float32, Adam at "
        f"{LEARNING_RATE:g}, binary cross-entropy, the pretrain metrics accuracy, AUC, "
        f"recall and precision; random images), through `rmib.training.fit` with a **global "
        f"batch of {s['global_batch']} images**: (a) one process with the default strategy; "
        f"(b) {s['workers']} worker processes on 127.0.0.1 (TF_CONFIG, free ports picked at "
        "run time) with MultiWorkerMirroredStrategy, each worker taking "
        f"{s['global_batch'] // s['workers']} images of every global batch "
        "(`AutoShardPolicy.DATA`) and the gradients all-reduced across the workers at every "
        f"step. Model: {params} parameters, {gradient} of float32 gradients all-reduced per "
        f"step in (b). Each process is a fresh child; {s['warmup_steps']} warm-up steps "
        f"excluded (tracing, the first collective), median of {s['timed_steps']} timed "
        "steps (the chief's; each step timed until its loss is read back). images/s = "
        "global batch / median step time; GFLOP/s = 3 x forward FLOPs x global batch / step "
        "time. Fit wall = the `rmib.training.fit` call (model build, tracing, steps, "
        "end-of-epoch checkpoints; the slower worker); process wall = launch to exit of all "
        "processes (imports, cluster start-up included).",
        table(header, rows),
    ]
    if result.get("ratio") is not None:
        single, multi = result["rows"][0], result["rows"][1]
        parts.append(
            f"**Two workers / one process: {result['ratio']:.2f}x the images/s** "
            f"({multi['images_per_second']:.3f} vs {single['images_per_second']:.3f}); "
            f"step time {multi['step_seconds']:.3f} s vs {single['step_seconds']:.3f} s "
            f"({result['overhead_seconds']:+.3f} s per step); process wall "
            f"{multi['process_seconds'] / single['process_seconds']:.2f}x."
        )
    parts.append(
        f"**What this measures.** Both runs are on this one {machine['cores']}-core "
        "machine: the two workers share the same cores (and each TensorFlow process sizes "
        "its thread pools for all of them), so together they do the single process's "
        "arithmetic on the same hardware, plus what distribution adds: the gradient "
        "all-reduce through TensorFlow's collective ops over loopback gRPC, the "
        "synchronisation of the workers at every step, each worker reading the whole "
        "global batch to keep its half, and the optimizer update applied by both workers "
        "to their own copy of every weight. The ratio is therefore **the overhead of the "
        "collective ops and the distributed loop, not a speed-up**: a ratio below 1 here is "
        "expected. On two machines each worker has its own cores and the ideal is "
        f"{s['workers']}x. The all-reduce grows with the parameter count (the gradient "
        "bytes), not with the image size, so its share of a step should be smaller at "
        "`rmib pretrain`'s 480 px than here (not measured)."
    )
    parts += [peak_line(result), NOISE_NOTE]
    return "\n\n".join(parts)


def _megabytes(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} MB" if value >= 10 else f"{value:.3g} MB"


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    """`python -m benchmarks.multiworker --child JOB --result PATH`: one child process."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multiworker")
    parser.add_argument("--child", required=True, help="the job, JSON")
    parser.add_argument("--result", required=True, type=Path, help="where to write the result")
    args = parser.parse_args(argv)
    result = child_run(json.loads(args.child))
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
