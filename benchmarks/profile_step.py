"""Per-op profile of one classifier training step (issue #19).

Builds `rmib.models.build_classifier` (random weights), compiles it with rmib's
optimizer (`rmib.training.make_optimizer`: fused Adam, as training and
pretrain_throughput compile) and binary cross-entropy, runs 2 warm-up
`train_on_batch` steps, then records `--steps` steps with the TensorFlow profiler and parses the trace's `.xplane.pb` directly
(no tensorboard_plugin_profile needed): every TensorFlow op event ("name:Type") of
the host plane is timed (its median over the steps, so one-off stalls drop out)
and summed by op type and by a category named after rmib's layers (backbones.py,
layers.py); the convolutions' achieved GFLOP/s use `benchmarks.flops`.

    taskset -c 1 python -m benchmarks.profile_step --model resnet50 --cbam \
        --precision mixed_bfloat16 --size 224 --batch 4

Prints a markdown table of category shares and the top ops; `--json` writes the
raw numbers too and `--report FILE...` prints them again.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time

# Ops that only contain other ops (their time would be counted twice).
_CONTAINERS = {"PartitionedCall", "StatefulPartitionedCall", "While", "If", "StatelessIf"}
_CONV = {
    "Conv2D",
    "Conv2DBackpropInput",
    "Conv2DBackpropFilter",
    "Conv2DBackpropFilterWithBias",
    "FusedConv2D",
}
_REDUCE = {"Mean", "Max", "Sum", "Min", "Prod"}
_EVENT = re.compile(r"^(?P<name>[^\s:]+):(?P<type>_?[A-Z][A-Za-z0-9_]*)$")


def _conv_kind(name):
    if "spatial_conv" in name:
        return None
    if "conv1_conv" in name:
        return "conv 7x7 (stem)"
    if re.search(r"_2_conv", name):
        return "conv 3x3"
    if re.search(r"_[013]_conv", name):
        return "conv 1x1"
    return "conv other"


def base_type(op_type):
    """The TensorFlow op type without oneDNN's prefix (_MklNativeFusedConv2D -> FusedConv2D)."""
    return re.sub(r"^_(MklNative|Mkl)?", "", op_type)


def category(name, op_type):
    """The category of one op from its scoped name and its type."""
    lowered = name.lower()
    op_type = base_type(op_type)
    if op_type in _CONTAINERS:
        return None
    if op_type == "Cast":
        return "cast"
    if "adam" in lowered or op_type.startswith("ResourceApply"):
        return "optimizer (Adam)"
    if re.search(r"block\d+_cbam", name):  # a CBAM layer, not the model's name
        if op_type in _CONV or op_type == "BiasAddGrad" and "spatial" in name:
            return "CBAM spatial 7x7 conv"
        if op_type in _REDUCE or "Max" in op_type and "Grad" not in op_type:
            return "CBAM poolings (mean/max)"
        if op_type in {"MatMul", "BiasAdd", "BiasAddGrad"}:
            return "CBAM MLP"
        return "CBAM gates / element-wise"
    if op_type in _CONV:
        return _conv_kind(name) or "conv other"
    if op_type in {"BiasAdd", "BiasAddGrad"} and "dense" not in lowered:
        return "conv bias (BiasAdd/Grad)"
    if op_type.startswith("FusedBatchNorm"):
        return "batch norm: fused kernels (FusedBatchNormV3/Ex/GradV3)"
    if "_bn" in name or "batch_normalization" in lowered:
        return "batch norm: other ops (moving stats)"
    if op_type in {"MaxPool", "MaxPoolGrad", "AvgPool", "AvgPoolGrad"}:
        return "max pool (stem)"
    if op_type in {"Pad", "PadV2", "Slice", "StridedSlice", "StridedSliceGrad"}:
        return "pad / slice"
    if op_type in {"MatMul", "BiasAdd", "BiasAddGrad"}:
        return "head Dense"
    return "element-wise / other"


def parse_xplane(path):
    """(type, category) -> [microseconds, count] and op name -> microseconds (robust)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as handle:
        space.ParseFromString(handle.read())
    durations = collections.defaultdict(list)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                match = _EVENT.match(plane.event_metadata[event.metadata_id].name)
                if match and category(match["name"], match["type"]) is not None:
                    durations[match[0]].append(event.duration_ps / 1e6)
    # Each op runs once a step: its median x the steps drops one-off stalls (this
    # 2-vCPU VM preempts an op now and then for ~100 ms).
    by_type = collections.defaultdict(lambda: [0.0, 0])
    by_name = {}
    for key, micros in durations.items():
        name, op_type = key.rsplit(":", 1)
        cat = category(name, op_type)
        robust = statistics.median(micros) * len(micros)
        by_type[(op_type, cat)][0] += robust
        by_type[(op_type, cat)][1] += len(micros)
        by_name[key] = robust
    return by_type, by_name


def profile(model_name, cbam, precision, size, batch, steps=5, warmup=2):
    import keras
    import numpy as np
    import tensorflow as tf

    from rmib import training
    from rmib.config import TrainConfig
    from rmib.models import build_classifier

    keras.mixed_precision.set_dtype_policy(precision)
    model = build_classifier(model_name, cbam=cbam, image_size=size, weights=None)
    optimizer = training.make_optimizer(TrainConfig(), steps_per_epoch=100)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    wall_plain = (time.perf_counter() - start) / steps
    logdir = tempfile.mkdtemp(prefix="rmib_prof_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    wall_traced = (time.perf_counter() - start) / steps
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, "plugins/profile/*/*.xplane.pb"))
    by_type, by_name = parse_xplane(path)
    return {
        "model": model_name + ("-cbam" if cbam else ""),
        "precision": precision,
        "size": size,
        "batch": batch,
        "steps": steps,
        "s_per_step": wall_plain,
        "s_per_step_traced": wall_traced,
        "by_type": {f"{t}|{c}": v for (t, c), v in by_type.items()},
        "by_name": dict(by_name),
    }


def conv_flops(model_name, cbam, size, batch):
    """Training-step FLOPs of the convolutions per kind (`benchmarks.flops`)."""
    import keras

    from benchmarks.flops import TRAIN_STEP_FACTOR, layer_flops
    from rmib.models import build_classifier

    keras.mixed_precision.set_dtype_policy("float32")
    model = build_classifier(model_name, cbam=cbam, image_size=size, weights=None)
    kinds = collections.defaultdict(int)
    for name, flops in layer_flops(model, (size, size, 3)):
        kind = "CBAM spatial 7x7 conv" if "spatial_conv" in name else _conv_kind(name)
        if "_conv" in name or "spatial_conv" in name:
            kinds[kind] += TRAIN_STEP_FACTOR * flops * batch
    return dict(kinds)


def report(result, top=10):
    """Markdown: category shares, then the top op types and op instances."""
    steps = result["steps"]
    by_type = collections.defaultdict(lambda: [0.0, 0])  # rebuilt: categories may change
    for key, micros in result["by_name"].items():
        name, op_type = key.rsplit(":", 1)
        by_type[(op_type, category(name, op_type))][0] += micros
        by_type[(op_type, category(name, op_type))][1] += steps
    total = sum(v[0] for v in by_type.values())
    cats = collections.defaultdict(lambda: [0.0, 0])
    for (_, cat), (micros, count) in by_type.items():
        cats[cat][0] += micros
        cats[cat][1] += count
    lines = [
        f"### {result['model']} {result['precision']} {result['size']} px batch "
        f"{result['batch']}: {result['s_per_step']:.3f} s/step "
        f"({result['s_per_step_traced']:.3f} traced; op time "
        f"{total / steps / 1e6:.3f} s/step)",
        "",
        "| category | ms/step | share | ops/step |",
        "|---|---|---|---|",
    ]
    for cat, (micros, count) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"| {cat} | {micros / steps / 1e3:.1f} | {100 * micros / total:.1f} % "
            f"| {count // steps} |"
        )
    if result.get("conv_flops"):
        lines += ["", "| conv kind | GFLOP/step | achieved GFLOP/s |", "|---|---|---|"]
        for kind, flops in sorted(result["conv_flops"].items()):
            seconds = cats.get(kind, [0.0])[0] / steps / 1e6
            rate = f"{flops / seconds / 1e9:.1f}" if seconds else "-"
            lines.append(f"| {kind} | {flops / 1e9:.2f} | {rate} |")
    lines += ["", "| op type (category) | ms/step | share | ops/step |", "|---|---|---|---|"]
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1][0])[:top]
    for (op_type, cat), (micros, count) in ranked:
        lines.append(
            f"| {op_type} ({cat}) | {micros / steps / 1e3:.1f} | "
            f"{100 * micros / total:.1f} % | {count // steps} |"
        )
    lines += ["", "| op instance | ms/step |", "|---|---|"]
    for name, micros in sorted(result["by_name"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{name}` | {micros / steps / 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "vgg16"])
    parser.add_argument("--cbam", action="store_true")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--report", nargs="+", help="only print the report of these --json files")
    args = parser.parse_args(argv)
    if args.report:
        for path in args.report:
            with open(path) as handle:
                result = json.load(handle)
            name = result["model"]
            result["conv_flops"] = conv_flops(
                name.split("-")[0], name.endswith("-cbam"), result["size"], result["batch"]
            )
            print(report(result))
        return
    result = profile(args.model, args.cbam, args.precision, args.size, args.batch, args.steps)
    result["conv_flops"] = conv_flops(args.model, args.cbam, args.size, args.batch)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle)
    print(report(result))


if __name__ == "__main__":
    main()
