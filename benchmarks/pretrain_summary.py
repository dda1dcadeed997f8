"""pretrain_throughput's summary, in the form of issue #19's table.

One line per model: its float32 and mixed_bfloat16 step times, the bf16 / fp32
speed-up beside the machine's own 3x3-convolution peak ratio, the share of the conv
peak of each precision, and what CBAM adds to the plain backbone's step.

The FLOPs of a training step are those of DESIGN.md "How performance is counted":
3 x the forward FLOPs (the forward pass and the backward pass's two products, the
input and the weight gradients), a multiply-add counting 2 FLOP. ResNet50 at
224 px is 7.7 forward GFLOP per image (3.86 G multiply-adds, He et al.'s
"3.8 x 10^9 FLOPs", which count multiply-adds), so 92.5 GFLOP per step of 4 images;
a share computed with the multiply-add count is half the true one.
"""

from __future__ import annotations

from benchmarks.flops import TRAIN_STEP_FACTOR

# The plain backbone whose step a CBAM variant's is compared with.
PLAIN_OF = {"vgg16_cbam": "vgg16", "resnet50_cbam": "resnet50"}


def step_gflop(forward_gflop: float, batch: int) -> float:
    """GFLOP of one training step: 3 x forward FLOPs per image x batch."""
    return TRAIN_STEP_FACTOR * forward_gflop * batch


def conv_peak_ratio(peak: dict) -> float | None:
    """The machine's bfloat16 / float32 3x3-convolution peak ratio (None if one is missing)."""
    f32, bf16 = peak["conv"].get("float32"), peak["conv"].get("bfloat16")
    return bf16 / f32 if f32 and bf16 else None


def conv_share(row: dict, peak: dict) -> float | None:
    """Percent of the 3x3-conv peak of the row's precision (bfloat16 for mixed_bfloat16)."""
    reference = peak["conv"].get("bfloat16" if "bfloat16" in row["precision"] else "float32")
    return 100.0 * row["gflops"] / reference if reference else None


def summary_rows(rows: list[dict], peak: dict) -> list[dict]:
    """Per model: s/step in each precision, bf16/fp32, % of the peak ratio, % of conv peak,
    CBAM's addition to the plain backbone's step in each precision (None where not measured).
    """
    by_key = {(r["model"], r["precision"]): r for r in rows}
    ratio = conv_peak_ratio(peak)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        f32, bf16 = by_key.get((model, "float32")), by_key.get((model, "mixed_bfloat16"))
        speedup = f32["step_seconds"] / bf16["step_seconds"] if f32 and bf16 else None
        plain = PLAIN_OF.get(model)
        added = {}
        for precision, row in (("float32", f32), ("mixed_bfloat16", bf16)):
            base = by_key.get((plain, precision))
            added[precision] = (
                100.0 * (row["step_seconds"] / base["step_seconds"] - 1.0) if row and base else None
            )
        out.append(
            {
                "model": model,
                "float32_seconds": f32["step_seconds"] if f32 else None,
                "bfloat16_seconds": bf16["step_seconds"] if bf16 else None,
                "speedup": speedup,
                "speedup_of_peak_ratio": 100.0 * speedup / ratio if speedup and ratio else None,
                "float32_share": conv_share(f32, peak) if f32 else None,
                "bfloat16_share": conv_share(bf16, peak) if bf16 else None,
                "cbam_added_float32": added["float32"],
                "cbam_added_bfloat16": added["mixed_bfloat16"],
            }
        )
    return out
