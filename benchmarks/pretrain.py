"""`pretrain_throughput`: training images/s of the stage-1 classifiers, float32 vs
mixed_bfloat16, each beside its keras.applications twin.

    python -m benchmarks.run --only pretrain_throughput --models vgg16,keras_vgg16
"""

from __future__ import annotations

import statistics
import time

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
from benchmarks.pretrain_summary import conv_peak_ratio, conv_share, step_gflop, summary_rows
from benchmarks.settings import PRETRAIN_MODELS, Settings, section_key

# Which keras.applications model each rmib model is compared with.
KERAS_TWIN = {
    "vgg16": "keras_vgg16",
    "vgg16_cbam": "keras_vgg16",
    "resnet50": "keras_resnet50",
    "resnet50_cbam": "keras_resnet50",
}


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
