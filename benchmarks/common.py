"""What every benchmark module shares: the load, the machine peak per precision,
the test photograph and the Markdown of a section (tables, the run line, the
peak line, the noise note).

`benchmarks/run.py` registers the benchmarks and writes BENCHMARKS.md; each
benchmark module imports these helpers from here, never another module's
private names.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PHOTO = (
    PROJECT_ROOT.parent
    / "shared/data/idrid-sample/A. Segmentation/1. Original Images/a. Training Set/IDRiD_03.jpg"
)
NOISE_NOTE = (
    "Measured on a CPU shared with other running jobs: absolute numbers are noisy "
    "(see the load averages); compare the ratios measured side by side. A % of peak "
    "above 100 only means the peak was measured at a busier moment than the row. "
    "**Regenerate on a quiet machine with `make bench` before quoting these numbers.**"
)


def load_average() -> str:
    """The 1/5/15-minute load averages, as "1.0/1.2/0.9" ("?" where the system has none)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def peak_for(peak: dict, precision: str) -> float | None:
    """The peak that bounds a Keras dtype policy: bfloat16 for mixed_bfloat16."""
    return peak["peak"]["bfloat16" if "bfloat16" in precision else "float32"]


def percent(value, reference) -> float | None:
    """100 * value / reference; None without a reference."""
    return None if not reference else 100.0 * value / reference


def photograph(shape, quick: bool):
    """The IDRiD sample photograph resized to `shape` (H, W), else a synthetic one.

    Returns:
        (uint8 RGB image, a description of its source).
    """
    import cv2

    from rmib import io
    from rmib.data import synthetic

    if not quick and SAMPLE_PHOTO.is_file():
        image = io.read_image(SAMPLE_PHOTO)
        source = f"IDRiD sample {SAMPLE_PHOTO.name}"
    else:
        image, _, _ = synthetic.synthesize_fundus(tuple(shape), seed=0, grade=3)
        source = "synthetic fundus"
    if image.shape[:2] != tuple(shape):
        image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        source += f" resized to {shape[1]}x{shape[0]}"
    return image, source


# --------------------------------------------------------------------------- Markdown


def fmt(value, digits=1) -> str:
    """`value` with `digits` decimals; "n/a" for None."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_line(machine: dict, settings) -> str:
    """The italic line under a section's title: when, where, which sizes."""
    kind = "QUICK smoke-test sizes, not a benchmark" if settings.quick else "sizes as stated"
    return (
        f"_Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores), "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}; {kind}; "
        f"load average at start {'/'.join(f'{x:.1f}' for x in machine['load'])}._"
    )


def peak_line(result: dict) -> str:
    """The peak a section's percentages are against, and what a partial run still lacks."""
    used = result["peak_used"]
    text = (
        f"Peak of the same run: float32 {fmt(used['float32'])} GFLOP/s, "
        f"bfloat16 {fmt(used['bfloat16'])} GFLOP/s."
    )
    if result.get("pending"):
        text += (
            " **Partial run**: still to be measured when this was written: "
            + "; ".join(result["pending"])
            + "."
        )
    return text
