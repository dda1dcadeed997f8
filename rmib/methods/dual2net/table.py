"""The Dual2Net ablation in the layout of the paper's Table 4 (and Tables 7/8 for regions).

One row per run of `rmib segment --model dual2net`, ordered as the paper:
single branch + class-balanced cross-entropy (`variant = "single-bce"`),
single branch + Dice (`"single-dice"`), dual branches + DSM (`"dual-dsm"`):

    | Method             | param | SN_pixel | PPV_pixel | F_pixel | IoU | AUPR |
    | ResNet50-PPM + CBCE | 33.4M | 0.9632  | 0.3361    | 0.4983  | ... | ...  |

followed by the region-level F-scores at sigma 0.2 ... 0.8. Numbers come
from each run's `metrics.json` ("validation": the held-out whole images), or
from the `metrics.json` of an `rmib evaluate` output (e.g. on the test split,
as the paper reports) given alongside the run. The AUPR column is average
precision ("aupr", the IDRiD challenge's metric); the paper's own AUPR figures
(supplementary Table 6, e.g. 0.7977 for Dual PSPNet + DSM on IDRiD) are the
authors' 11-threshold trapezoid, "aupr_11pt_trapezoid" in an `rmib evaluate`
metrics.json: compare them with that, not with this column.

Usage:
    python -m rmib.methods.dual2net.table RUN_BCE RUN_DICE RUN_DSM \\
        [--eval EVAL_BCE --eval EVAL_DICE --eval EVAL_DSM] [--out table.md]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from rmib import training
from rmib.errors import RmibError
from rmib.io import atomic_write
from rmib.metrics import REGION_SIGMAS

VARIANT_ORDER = ("single-bce", "single-dice", "dual-dsm")
_BACKBONE_NAMES = {"vgg16": "VGG16", "resnet50": "ResNet50"}
_HEAD_NAMES = {"ppm": "PPM", "decoder": "Decoder"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RmibError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RmibError(f"{path}: not valid JSON ({exc})") from None


def _evaluation_metrics(path) -> dict:
    path = Path(path)
    return _read_json(path / "metrics.json" if path.is_dir() else path)


def load_row(run, evaluation=None) -> dict:
    """One table row: the run's variant, backbone, head, parameter count and metrics.

    Args:
        run: a Dual2Net run directory.
        evaluation: optional `rmib evaluate` output directory (or its
            metrics.json) whose numbers replace the run's validation metrics.

    Raises:
        RmibError: not a Dual2Net run, or no metrics to show.
    """
    run = Path(run)
    metadata = training.read_run_metadata(run)
    if metadata.get("model") != "dual2net":
        raise RmibError(f"{run}: not a Dual2Net run (model {metadata.get('model')!r})")
    if evaluation is not None:
        values = _evaluation_metrics(evaluation)
    else:
        values = training.RunDirectory(run, create=False).read_metrics().get("validation") or {}
    if not values:
        raise RmibError(
            f"{run}: no validation metrics in its metrics.json; pass the metrics.json of "
            "an `rmib evaluate` output instead"
        )
    return {
        "run": str(run),
        "variant": metadata.get("variant", "dual-dsm"),
        "backbone": str(metadata.get("backbone") or "?"),
        "head": metadata.get("head", "ppm"),
        "parameters": metadata.get("parameters"),
        "metrics": values,
    }


def method_name(row: dict) -> str:
    """E.g. "ResNet50-PPM + CBCE", "ResNet50-PPM + Dice", "Dual ResNet50-PPM + DSM"."""
    backbone = row["backbone"]
    cbam = backbone.endswith("_cbam")
    base = _BACKBONE_NAMES.get(backbone.removesuffix("_cbam"), backbone.removesuffix("_cbam"))
    base += "-CBAM" if cbam else ""
    base += "-" + _HEAD_NAMES.get(row["head"], row["head"])
    return {
        "single-bce": f"{base} + CBCE",
        "single-dice": f"{base} + Dice",
        "dual-dsm": f"Dual {base} + DSM",
    }.get(row["variant"], f"{base} ({row['variant']})")


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _params(value) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}M"


def format_table(rows: list[dict], title: str | None = None) -> str:
    """Markdown: the Table 4 layout (pixel level) and the region-level F-scores."""
    rows = sorted(
        rows,
        key=lambda r: VARIANT_ORDER.index(r["variant"]) if r["variant"] in VARIANT_ORDER else 99,
    )
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| Method | param | SN_pixel | PPV_pixel | F_pixel | IoU | AUPR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        m = row["metrics"]
        cells = [m.get("sensitivity"), m.get("ppv"), m.get("f1"), m.get("iou"), m.get("aupr")]
        lines.append(
            f"| {method_name(row)} | {_params(row['parameters'])} | "
            + " | ".join(_number(c) for c in cells)
            + " |"
        )
    lines += [
        "",
        "| Method | " + " | ".join(f"F_sigma={s}" for s in REGION_SIGMAS) + " |",
        "| --- |" + " ---: |" * len(REGION_SIGMAS),
    ]
    for row in rows:
        region = row["metrics"].get("region_f_score") or {}
        cells = [region.get(str(s), region.get(s)) for s in REGION_SIGMAS]
        lines.append(f"| {method_name(row)} | " + " | ".join(_number(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def dual2net_table(runs, evaluations=None, out=None, title=None) -> str:
    """The Table 4 layout for Dual2Net runs (any order; rows follow the paper's).

    Args:
        runs: Dual2Net run directories (typically one per `variant`).
        evaluations: None, or one `rmib evaluate` output (directory or
            metrics.json) per run, whose numbers are shown instead.
        out: write the Markdown here too (atomically).
        title: optional heading.

    Returns:
        The Markdown text.

    Raises:
        RmibError: a run that is not Dual2Net, missing metrics, or a number
            of evaluations different from the number of runs.
    """
    runs = list(runs)
    if not runs:
        raise RmibError("no Dual2Net run given")
    evaluations = list(evaluations) if evaluations else [None] * len(runs)
    if len(evaluations) != len(runs):
        raise RmibError(
            f"{len(evaluations)} evaluations for {len(runs)} runs: give one per run, in order"
        )
    text = format_table(
        [load_row(run, ev) for run, ev in zip(runs, evaluations, strict=True)], title
    )
    if out is not None:
        with atomic_write(Path(out), "w", encoding="utf-8") as f:
            f.write(text)
    return text


@click.command(name="dual2net-table")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--eval",
    "evaluations",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="An `rmib evaluate` output per run (same order): show its numbers instead.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Also write the table here.")
@click.option("--title", help="A heading above the table.")
def main(runs, evaluations, out, title):
    """Print the Dual2Net ablation (paper Table 4 layout) of RUNS."""
    try:
        click.echo(dual2net_table(runs, evaluations or None, out, title), nl=False)
    except RmibError as exc:
        raise click.ClickException(str(exc)) from None


__all__ = ["dual2net_table", "format_table", "load_row", "method_name"]


if __name__ == "__main__":  # pragma: no cover
    main()
