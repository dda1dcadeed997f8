"""`python -m benchmarks.idrid_real unet | render | frozen-cost`: idrid_real's own commands.

Not imported by the package (it imports `benchmarks.run`, which imports the package).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import PROJECT_ROOT
from benchmarks.idrid_real.frozen_cost import frozen_encoder_cost
from benchmarks.idrid_real.render import render_idrid_real
from benchmarks.idrid_real.results import RESULTS, load_results
from benchmarks.idrid_real.rows import FINAL_MINUTES
from benchmarks.idrid_real.unet import train_reference_unet
from benchmarks.run import merge_sections
from benchmarks.settings import Settings, section_key


def render_committed(out: Path, results_file: Path = RESULTS) -> None:
    """Re-render the BENCHMARKS.md section of measured rows, measuring nothing.

    `results_file` is the committed json (the final rows) or a screening json of
    the work directory, whose rows go into their own "screening" section.
    """
    results = load_results(results_file)
    shown = results_file.relative_to(PROJECT_ROOT) if results_file == RESULTS else results_file
    results.setdefault("results_file", str(shown))
    settings = Settings(idrid_minutes=results.get("minutes", FINAL_MINUTES))
    key = section_key("idrid_real", settings)
    merge_sections(out, {key: render_idrid_real(results, {}, settings)})


USAGE = (
    "usage: python -m benchmarks.idrid_real unet --data ROOT ...  (row e)\n"
    "       python -m benchmarks.idrid_real render BENCHMARKS.md [RESULTS.json]  (measured rows)\n"
    "       python -m benchmarks.idrid_real frozen-cost [SIZE BATCH]  (a frozen step in parts)"
)


def main(argv=None) -> None:
    """Dispatch `argv` (default: the command line) to row (e), the renderer or the frozen cost."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["unet"]:
        train_reference_unet(argv[1:])
    elif argv[:1] == ["frozen-cost"]:
        size, batch = (int(v) for v in (argv[1:3] or (256, 8)))
        print(json.dumps(frozen_encoder_cost(size, batch), indent=2))
    elif argv[:1] == ["render"] and len(argv) in (2, 3):
        render_committed(Path(argv[1]), *(Path(a).resolve() for a in argv[2:]))
    else:
        raise SystemExit(USAGE)
