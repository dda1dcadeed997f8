"""Table 1 of Yan et al. (ISBI 2019) from `rmib evaluate` results: AUPR per lesion per method.

Lay the evaluation folders out as RESULTS/<method>/<lesion>/metrics.json (any
depth below <method> works: the lesion is read from the file), e.g.

    runs/ablation/eval/global/EX/metrics.json      rmib evaluate ... --out runs/ablation/eval/global/EX
    runs/ablation/eval/local/EX/metrics.json
    runs/ablation/eval/fused/EX/metrics.json

and run

    python -m rmib.methods.local_global.table runs/ablation/eval [--paper] [--format markdown|csv]

The methods "global", "local" and "fused" are named and ordered as in the
paper (GlobalNet, LocalNet, fused); any other folder (say "encoder-decoder" or
"dual2net") becomes a row of its own. Columns follow the paper: EX, MA, HE, SE.
The best value of each column is in bold (markdown). `--paper` adds the
paper's published rows for comparison: they are the ISBI 2018 (IDRiD)
challenge's AUPR, precision-recall at every distinct probability, i.e. average
precision, the "aupr" of metrics.json that the table shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rmib.errors import RmibError

LESION_COLUMNS = ("EX", "MA", "HE", "SE")  # Table 1's order
METHOD_LABELS = {"global": "GlobalNet", "local": "LocalNet", "fused": "Fused local-global"}
# Yan et al. 2019, Table 1 (AUPR on the 27 IDRiD test photographs).
PAPER_TABLE1 = {
    "GlobalNet (paper)": {"EX": 0.849, "MA": 0.484, "HE": 0.711, "SE": 0.720},
    "LocalNet (paper)": {"EX": 0.845, "MA": 0.433, "HE": 0.696, "SE": 0.653},
    "Fused model (paper)": {"EX": 0.889, "MA": 0.525, "HE": 0.703, "SE": 0.679},
}
FORMATS = ("markdown", "csv")


def collect_results(root) -> dict:
    """{method label: {lesion: AUPR}} from every RESULTS/<method>/**/metrics.json.

    Raises:
        RmibError: `root` is not a folder, holds no metrics.json, a file is not
            valid JSON or lacks "aupr" / "lesion", or two files give the same
            method and lesion.
    """
    root = Path(root)
    if not root.is_dir():
        raise RmibError(f"{root}: not a folder of evaluation results")
    results: dict = {}
    sources: dict = {}
    files = sorted(root.glob("*/**/metrics.json"))
    if not files:
        raise RmibError(
            f"{root}: no <method>/.../metrics.json below it; write them with "
            "`rmib evaluate RUN --data ... --out RESULTS/<method>/<lesion>`"
        )
    for path in files:
        method = path.relative_to(root).parts[0]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RmibError(f"{path}: not a readable metrics.json ({exc})") from None
        if not isinstance(data, dict) or "aupr" not in data or "lesion" not in data:
            raise RmibError(f"{path}: has no 'aupr' and 'lesion' (not written by rmib evaluate?)")
        label = METHOD_LABELS.get(method, method)
        lesion = str(data["lesion"])
        if lesion in results.get(label, {}):
            raise RmibError(
                f"{path}: a second {lesion} result for {method} (first: {sources[label, lesion]})"
            )
        value = data["aupr"]
        results.setdefault(label, {})[lesion] = float("nan") if value is None else float(value)
        sources[label, lesion] = path
    return results


def _ordered(results: dict) -> list:
    known = [label for label in METHOD_LABELS.values() if label in results]
    paper = [label for label in PAPER_TABLE1 if label in results]
    others = sorted(label for label in results if label not in known and label not in paper)
    return known + others + paper


def format_table(results: dict, fmt: str = "markdown", lesions=None, bold_best: bool = True) -> str:
    """The table as text: one row per method, one AUPR column per lesion (3 decimals).

    Args:
        results: {method label: {lesion: AUPR}} (`collect_results`).
        fmt: "markdown" (best per column in bold, missing values "-") or "csv"
            (missing values empty).
        lesions: the columns; default EX, MA, HE, SE followed by any other
            lesion present.
        bold_best: bold the best value of each column (markdown).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    present = {lesion for row in results.values() for lesion in row}
    if lesions is None:
        lesions = [c for c in LESION_COLUMNS if c in present] + sorted(
            present - set(LESION_COLUMNS)
        )
    rows = _ordered(results)

    def finite(value):
        return value is not None and not math.isnan(value)

    best = {}
    for lesion in lesions:
        values = [results[r].get(lesion) for r in rows if finite(results[r].get(lesion))]
        best[lesion] = max(values) if values else None
    lines = []
    if fmt == "csv":
        lines.append(",".join(["method", *lesions]))
        for row in rows:
            cells = [
                f"{results[row][c]:.3f}" if finite(results[row].get(c)) else "" for c in lesions
            ]
            lines.append(",".join([row, *cells]))
        return "\n".join(lines) + "\n"
    lines.append("| Method / AUPR | " + " | ".join(lesions) + " |")
    lines.append("| --- |" + " --- |" * len(lesions))
    for row in rows:
        cells = []
        for lesion in lesions:
            value = results[row].get(lesion)
            if not finite(value):
                cells.append("-")
                continue
            text = f"{value:.3f}"
            if bold_best and best[lesion] is not None and f"{best[lesion]:.3f}" == text:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(root, fmt: str = "markdown", paper: bool = False) -> str:
    """Table 1's layout from the `rmib evaluate` results under `root` (see the module doc)."""
    results = collect_results(root)
    if paper:
        results.update(PAPER_TABLE1)
    return format_table(results, fmt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rmib.methods.local_global.table",
        description="AUPR per lesion per method (Yan et al. 2019, Table 1) from "
        "RESULTS/<method>/<lesion>/metrics.json files written by `rmib evaluate`.",
    )
    parser.add_argument("results", type=Path, help="folder holding <method>/.../metrics.json")
    parser.add_argument("--format", choices=FORMATS, default="markdown")
    parser.add_argument("--paper", action="store_true", help="add the paper's rows")
    parser.add_argument("--out", type=Path, help="write the table here as well")
    args = parser.parse_args(argv)
    try:
        table = ablation_table(args.results, args.format, args.paper)
    except RmibError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        from rmib.io import atomic_write

        with atomic_write(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through `python -m`
    sys.exit(main())
