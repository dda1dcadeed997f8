"""The photographs a segmenter trains and validates on: every root's annotated records, split."""

from __future__ import annotations

from rmib.data import readers
from rmib.data.pipeline import (
    split_by_names,
    stratified_split,
)
from rmib.errors import RmibError
from rmib.methods.segment_config import SegmentConfig


def lesion_records(data_roots, lesion, on_bad="error"):
    """Records of every root annotated for `lesion`.

    Raises:
        RmibError: no root, no image annotated for the lesion, or a root whose
            every mask of the lesion is all zero (`readers.require_lesion_pixels`).
    """
    if not data_roots:
        raise RmibError("no --data given: name at least one dataset root with lesion masks")
    records, seen = [], []
    for root in data_roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        # A dataset's own test split is kept for `rmib evaluate --split test`.
        chosen = [r for r in dataset.with_lesion(lesion) if r.split != "test"]
        readers.require_lesion_pixels(chosen, lesion, root)
        seen.append(f"{root} ({dataset.layout}: {len(chosen)} of {len(dataset)})")
        records += chosen
    if not records:
        raise RmibError(f"no image annotated for {lesion} in {'; '.join(seen)}")
    return records


def split_records(records, cfg: SegmentConfig):
    """Whole images held out for validation: --val-names, else a stratified --val-fraction."""
    if cfg.val_names:
        return split_by_names(records, cfg.val_names)
    if cfg.val_fraction == 0:
        return list(records), []
    if len(records) < 2:
        raise RmibError(f"{len(records)} image(s) annotated: need 2 or more to hold one out")
    return stratified_split(
        records,
        cfg.val_fraction,
        seed=cfg.train.seed,
        key=lambda r: r.masks.get(cfg.lesion) is not None,
    )
