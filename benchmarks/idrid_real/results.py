"""idrid_real's results: the json of measured rows, which rows are left, where they go."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import PROJECT_ROOT
from benchmarks.idrid_real.rows import FINAL_MINUTES, ROWS, run_name

RESULTS = PROJECT_ROOT / "benchmarks" / "idrid_real.json"


def load_results(path: Path) -> dict:
    """{"rows": {key: record}} of `path`, empty when it does not exist yet."""
    if not path.is_file():
        return {"rows": {}}
    results = json.loads(path.read_text())
    if not isinstance(results.get("rows"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'rows' object")
    return results


def save_results(path: Path, results: dict) -> None:
    from rmib.io import atomic_write

    with atomic_write(path) as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")


def add_row(path: Path, results: dict, name: str, record: dict) -> dict:
    """`results` with row `name` added and the rows already in `path`, written to `path`.

    Rows pinned to the two cores may finish together: the read, merge and write
    hold an exclusive lock (`.<name>.lock` beside the json), so neither loses the
    other's row.
    """
    import fcntl

    lock = path.parent / f".{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            results["rows"] = {**load_results(path)["rows"], name: record}
            save_results(path, results)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return results


def pending_rows(results: dict, wanted, lever=None) -> list[str]:
    """The keys of `wanted` (in `ROWS` order) not yet measured in `results` (with `lever`)."""
    unknown = [k for k in wanted if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown idrid_real row(s) {unknown}; valid: {', '.join(ROWS)}")
    done = {k for k, row in results["rows"].items() if "ap" in row or "roc_auc" in row}
    ctx = {"lever": lever}
    return [k for k in ROWS if k in wanted and run_name(k, ctx) not in done]


def results_path(quick: bool, minutes: float, workdir: Path) -> Path:
    """Final rows go into the committed json; screening and quick rows stay in the work dir."""
    if quick:
        return workdir / "idrid_real_quick.json"
    if minutes != FINAL_MINUTES:
        return workdir / f"idrid_real_screening_{minutes:g}min.json"
    return RESULTS
