"""idrid_real's data: the official IDRiD training portion, its fixed validation
photographs and the stage-1 view of the graded photographs (`../shared/data/idrid/README`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from benchmarks.common import PROJECT_ROOT

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
IDRID = SHARED_DATA / "idrid"
IDRID_SAMPLE = SHARED_DATA / "idrid-sample"
VAL_NAMES = tuple(f"IDRiD_{n:02d}" for n in (3, 8, 13, 18, 23, 28, 33, 38, 43, 48, 53))
GRADING_CSV = Path(
    "B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"
)
GRADING_IMAGES = Path("B. Disease Grading/1. Original Images/a. Training Set")


def split_names(names) -> tuple[list[str], list[str]]:
    """(training, validation) photograph names: validation = those of `VAL_NAMES` present."""
    names = sorted(set(names))
    return [n for n in names if n not in VAL_NAMES], [n for n in names if n in VAL_NAMES]


def stage1_exclusions(duplicates_csv: Path, val_names=VAL_NAMES) -> set[str]:
    """Graded photographs that are copies of the segmentation validation photographs.

    Raises:
        ValueError: the file lacks the columns segmentation_photograph, grading_photograph.
    """
    with open(duplicates_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"segmentation_photograph", "grading_photograph"} <= set(rows[0]):
        raise ValueError(
            f"{duplicates_csv}: expected the columns segmentation_photograph, "
            f"grading_photograph; got {', '.join(rows[0])}"
        )
    wanted = set(val_names)
    return {r["grading_photograph"] for r in rows if r["segmentation_photograph"] in wanted}


def build_stage1_view(idrid_root: Path, out: Path, val_names=VAL_NAMES) -> dict:
    """A healthy/ + lesion/ folder of symbolic links to the graded photographs to train on.

    Lesion = DR grade > 0; the graded copies of `val_names` are left out.

    Returns:
        {"healthy": n, "lesion": n, "excluded": sorted names}.
    """
    excluded = stage1_exclusions(idrid_root / "duplicates.csv", val_names)
    counts = {"healthy": 0, "lesion": 0}
    for label in counts:
        (out / label).mkdir(parents=True, exist_ok=True)
    with open(idrid_root / GRADING_CSV, newline="") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("Image name") or "").strip()
            if not name or name in excluded:
                continue
            label = "lesion" if int(row["Retinopathy grade"]) > 0 else "healthy"
            link = out / label / f"{name}.jpg"
            if not link.is_symlink():
                link.symlink_to((idrid_root / GRADING_IMAGES / f"{name}.jpg").resolve())
            counts[label] += 1
    return {**counts, "excluded": sorted(excluded)}
