"""Old and new side by side: classifier training steps (or one CBAM layer) in one process.

Issue #19 asks each change to the training step to be measured against the old code
in the same run: this module builds every variant asked for, in every precision,
then times their steps in turns (round 1: every variant once, round 2: again, ...)
and reports medians and ratios, so a change in the shared machine's load hits
every variant alike.

A variant is `MODEL[/CBAM][+jit][+kadam][+bN]` (the + options in any order):
- MODEL: resnet50, resnet50_cbam, vgg16, vgg16_cbam (`rmib.models.build_classifier`,
  weights=None, rmib's Adam (`rmib.training.FusedAdam`), binary cross-entropy);
- /CBAM: how CBAM trains (`CBAM.implementation`): fused (the default) or plain (the
  formula left to automatic differentiation, the old code);
- +jit: `model.compile(jit_compile=True)`, the whole step through XLA;
- +kadam: `keras.optimizers.Adam` (~26 graph ops per variable) instead of rmib's;
- +bN: batch N instead of `--batch` (compare images/s).

    taskset -c 1 python -m benchmarks.step_ablation --size 224 --batch 4 \\
        --variants resnet50,resnet50_cbam/plain,resnet50_cbam/fused
    taskset -c 1 python -m benchmarks.step_ablation --size 224 --batch 4 \\
        --variants resnet50,resnet50+kadam,resnet50_cbam,resnet50_cbam+kadam

`--layer` times one CBAM layer's forward + backward pass instead, at the shapes of
ResNet50's four stages (224 px, batch 4), per implementation.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

_VARIANT = re.compile(r"^(?P<model>resnet50|vgg16)(?P<cbam>_cbam)?(?:/(?P<impl>fused|plain))?$")
_OPTION = re.compile(r"^(?:jit|kadam|b[1-9]\d*)$")
# ResNet50's CBAM inputs at 224 px: (side, channels) of each stage.
RESNET50_STAGES = ((56, 256), (28, 512), (14, 1024), (7, 2048))


def parse_variant(text, batch):
    """{"name", "model", "cbam", "implementation", "jit", "keras_adam", "batch"} of a variant."""
    usage = "expected MODEL[_cbam][/fused|plain][+jit][+kadam][+bN]"
    base, *options = text.strip().split("+")
    match = _VARIANT.match(base)
    if not match:
        raise SystemExit(f"bad variant {text!r}: {usage}")
    if match["impl"] and not match["cbam"]:
        raise SystemExit(f"variant {text!r}: a CBAM implementation needs a _cbam model")
    for option in options:
        if not _OPTION.match(option):
            raise SystemExit(f"variant {text!r}: unknown option +{option}; {usage}")
    kinds = ["b" if o.startswith("b") else o for o in options]
    if len(set(kinds)) != len(kinds):
        raise SystemExit(f"variant {text!r}: an option given twice")
    sizes = [int(o[1:]) for o in options if o.startswith("b")]
    return {
        "name": text.strip(),
        "model": match["model"],
        "cbam": bool(match["cbam"]),
        "implementation": match["impl"] or "fused",
        "jit": "jit" in options,
        "keras_adam": "kadam" in options,
        "batch": sizes[0] if sizes else batch,
    }


def _classifier_step(variant, precision, size):
    """A function taking one timed training step of `variant` under `precision`."""
    import keras
    import numpy as np

    from rmib.models import CBAM, build_classifier
    from rmib.training import FusedAdam

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_classifier(
            variant["model"], cbam=variant["cbam"], image_size=size, weights=None
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, CBAM):
            layer.implementation = variant["implementation"]
    model.compile(
        optimizer=(keras.optimizers.Adam if variant["keras_adam"] else FusedAdam)(1e-4),
        loss="binary_crossentropy",
        jit_compile=variant["jit"],
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (variant["batch"], size, size, 3)).astype("float32")
    labels = rng.integers(0, 2, (variant["batch"], 1)).astype("float32")

    def step():
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        return time.perf_counter() - start

    return step


def _layer_step(implementation, precision, side, channels, batch=4):
    """A function timing one CBAM forward + backward pass (input and weight gradients)."""
    import numpy as np
    import tensorflow as tf

    from rmib.models import CBAM

    layer = CBAM(dtype=precision)
    layer.build((None, side, side, channels))
    layer.implementation = implementation
    rng = np.random.default_rng(0)
    layer.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") for w in layer.weights])
    shape = (batch, side, side, channels)
    x = tf.cast(rng.normal(0, 1, shape).astype("float32"), layer.compute_dtype)
    upstream = tf.cast(rng.normal(0, 1, shape).astype("float32"), layer.compute_dtype)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
        grads = tape.gradient(out, [x, *layer.trainable_weights], output_gradients=upstream)
        return sum(tf.reduce_sum(tf.cast(g[..., :1], "float32")) for g in grads)

    def step():
        start = time.perf_counter()
        float(run())
        return time.perf_counter() - start

    return step


def interleaved(steps, warmup, rounds):
    """{key: [seconds...]}: every step `warmup` times, then `rounds` rounds of one each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            seconds[key].append(step())
    return seconds


def report(seconds, images, reference_of):
    """Markdown table: median s, spread, images/s, and the ratios of the medians to the
    reference variant's (`reference_of(name)`) in the same precision: per step and per image.
    """
    lines = [
        "| variant | precision | s/step (median) | min-max | images/s | step time vs "
        "reference | time per image vs reference | reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, precision), times in seconds.items():
        median = statistics.median(times)
        reference = reference_of(name)
        base = seconds.get((reference, precision))
        ratio = per_image = "-"
        if base:
            ratio = f"{median / statistics.median(base):.3f}"
            per_image = median / images[name] / (statistics.median(base) / images[reference])
            per_image = f"{per_image:.3f}"
        lines.append(
            f"| {name} | {precision} | {median:.3f} | {min(times):.3f}-{max(times):.3f} | "
            f"{images[name] / median:.2f} | {ratio} | {per_image} | {reference} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="resnet50,resnet50_cbam/plain,resnet50_cbam/fused")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layer", action="store_true", help="one CBAM layer per stage shape")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    steps, images = {}, {}
    if args.layer:
        implementations = [v.strip() for v in args.variants.split(",") if v.strip()]
        for side, channels in RESNET50_STAGES:
            for implementation in implementations:
                name = f"{implementation} {side}x{side}x{channels}"
                images[name] = args.batch
                for precision in precisions:
                    steps[name, precision] = _layer_step(
                        implementation, precision, side, channels, args.batch
                    )

        def reference_of(name):
            return "plain " + name.split(" ", 1)[1]

    else:
        variants = [parse_variant(v, args.batch) for v in args.variants.split(",") if v.strip()]
        for variant in variants:
            images[variant["name"]] = variant["batch"]
            for precision in precisions:
                steps[variant["name"], precision] = _classifier_step(variant, precision, args.size)

        def reference_of(name):
            return variants[0]["name"]

    seconds = interleaved(steps, args.warmup, args.rounds)
    print(report(seconds, images, reference_of), flush=True)
    return seconds


if __name__ == "__main__":
    main()
