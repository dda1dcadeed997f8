"""`rmib predict` and `rmib evaluate`: whole photographs through a segmenter."""

from __future__ import annotations

import csv
import functools
import io as _io
import json
from pathlib import Path

import click
import numpy as np

from rmib import io, metrics, report
from rmib.data import readers
from rmib.data.pipeline import PreprocessedCache, whole_images
from rmib.errors import BadInputError, RmibError

REGION_SIGMAS = (0.2, 0.35, 0.5, 0.65, 0.8)


def collect_images(inputs) -> list[Path]:
    """Image files named directly or found (non-recursively) in the folders named."""
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and io.is_image_file(p))
            if not found:
                raise RmibError(f"{item}: no image files in this folder")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise RmibError(f"{item}: no such file or folder")
    return paths


# Pixels per strip when a full-size map is converted piece by piece: the
# conversions' float / int64 temporaries (up to ~50 bytes a pixel) then cost a
# strip of a few MB, whatever the photograph's size.
STRIP_PIXELS = 1 << 18


def _by_strips(function, array: np.ndarray, out: np.ndarray, *more) -> np.ndarray:
    """`out[rows] = function(array[rows], *(m[rows] for m in more))`, strip by strip."""
    height, width = array.shape[:2]
    step = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, step):
        rows = slice(top, top + step)
        out[rows] = function(array[rows], *(m[rows] for m in more))
    return out


def save_probability_png(path, prob):
    """A probability map as a 16-bit PNG (0..65535 = 0..1), the resolution evaluation uses."""
    prob = np.asarray(prob)
    io.write_image(path, _by_strips(metrics.quantize16, prob, np.empty(prob.shape, np.uint16)))


def read_probability_png(path) -> np.ndarray:
    import cv2

    data = np.fromfile(path, np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535.0


def write_skipped(out: Path, problems):
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "reason"])
    writer.writerows(problems)
    with io.atomic_write(out / "skipped.csv") as f:
        f.write(buffer.getvalue())


def predict_files(segmenter, inputs, out, threshold=0.5, on_bad="error", echo=click.echo):
    """Predict every image; write <stem>_prob.png (16-bit), <stem>_mask.png, <stem>_overlay.png.

    Returns:
        (list of written stems, list of (file, reason) skipped)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = collect_images(inputs)
    done, problems = [], []
    colour = report.LESION_COLOURS.get(segmenter.lesion, (255, 255, 0))
    with click.progressbar(paths, label="Predicting", file=click.get_text_stream("stderr")) as bar:
        for path in bar:
            try:
                image = io.read_image(path)
            except BadInputError as exc:
                if on_bad != "skip":
                    raise
                problems.append((exc.path, exc.reason))
                continue
            stem = path.stem
            _predict_and_write(segmenter, image, out, stem, threshold, colour)
            done.append(stem)
    if problems:
        write_skipped(out, problems)
        if not done:
            raise RmibError(f"no image could be read; see {out / 'skipped.csv'}")
    return done, problems


def _predict_and_write(segmenter, image, out: Path, stem: str, threshold, colour) -> None:
    """Predict one photograph; write <stem>_prob.png, _mask.png and _overlay.png.

    Memory: beyond the photograph and the maps written, only strips of
    temporaries (the float overlay blend, the quantisation) and a copy for
    encoding; the probability map is released once the overlay is blended.
    """
    prob = segmenter.predict(image)
    save_probability_png(out / f"{stem}_prob.png", prob)
    mask = np.greater_equal(prob, threshold).view(np.uint8)  # 0/1 without a copy
    io.write_image(out / f"{stem}_mask.png", mask * np.uint8(255))
    blend = functools.partial(report.probability_overlay, colour=colour)
    overlay = _by_strips(blend, image, np.empty(image.shape, np.uint8), prob)
    del prob
    overlay = report.mask_outline_overlay(overlay, mask, colour)
    io.write_image(out / f"{stem}_overlay.png", overlay)


def evaluate_dataset(
    segmenter,
    data_roots,
    out,
    *,
    lesion=None,
    threshold=0.5,
    fov_only=False,
    split=None,
    names=None,
    on_bad="error",
    overlays=True,
    cache_dir=None,
    echo=click.echo,
):
    """Evaluate a segmenter on every image of `data_roots` annotated for its lesion.

    Writes metrics.json, per_image.csv, pr_curve.png and comparison overlays
    (TP yellow, FP green, FN red) to `out`. metrics.json has "aupr" (average
    precision, the IDRiD challenge's AUPR) and "aupr_11pt_trapezoid" (the Dual2Net
    authors' 11-threshold trapezoid, `rmib.metrics.aupr_11pt_trapezoid`), all
    pixels of all images pooled.

    Returns:
        the metrics dict.
    """
    lesion = lesion or segmenter.lesion
    if lesion is None:
        raise RmibError("the model's metadata has no lesion type; pass --lesion")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for root in data_roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        records += [r for r in dataset.records if r.has_mask(lesion)]
    if split:
        records = [r for r in records if r.split == split]
    if names:
        wanted = set(names)
        records = [r for r in records if r.name in wanted]
    if not records:
        raise RmibError(
            f"no image in {', '.join(map(str, data_roots))} is annotated for {lesion}"
            + (f" in split {split!r}" if split else "")
        )
    aupr = metrics.StreamingAUPR()
    regions = metrics.RegionScore(REGION_SIGMAS)
    totals = np.zeros(4, np.int64)  # tp, fp, fn, tn
    rows, problems = [], []
    cache = PreprocessedCache(cache_dir)
    examples = whole_images(records, lesion, segmenter.preprocessing, cache, on_bad, problems)
    with click.progressbar(
        examples, length=len(records), label="Evaluating", file=click.get_text_stream("stderr")
    ) as bar:
        for example in bar:
            truth = np.asarray(example.mask)
            fov = np.asarray(example.fov)
            prob = segmenter.predict_prepared(np.asarray(example.image), fov)
            region = fov if fov_only else None
            aupr.update(truth, prob, mask=region)
            pred = prob >= threshold
            counts = metrics.confusion_counts(pred, truth, mask=region)
            totals += np.asarray(counts, np.int64)
            regions.update(pred, truth)
            single = metrics.StreamingAUPR()
            single.update(truth, prob, mask=region)
            row = {"image": example.name, "lesion_pixels": int(truth.sum())}
            row["aupr"] = single.result() if truth.any() else float("nan")
            row.update(metrics.pixel_metrics(*counts))
            rows.append(row)
            if overlays:
                io.write_image(
                    out / "overlays" / f"{example.name}_compare.png",
                    report.comparison_map(pred, truth),
                )
    if not rows:
        raise RmibError("no image could be evaluated")
    result = {
        "lesion": lesion,
        "images": len(rows),
        "threshold": threshold,
        "fov_only": fov_only,
        "aupr": aupr.result(),
        # The Dual2Net authors' AUPR, to compare with their published figures.
        "aupr_11pt_trapezoid": aupr.aupr_11pt_trapezoid(),
        **metrics.pixel_metrics(*totals),
        "region_f_score": {str(s): regions.f_score(s) for s in REGION_SIGMAS},
    }
    with io.atomic_write(out / "metrics.json") as f:
        json.dump(result, f, indent=2, default=float)
    _write_rows(out / "per_image.csv", rows)
    metrics.save_pr_curve_from_stream(aupr, out / "pr_curve.png", title=f"{lesion} PR curve")
    if problems:
        write_skipped(out, problems)
    return result


def _write_rows(path, rows):
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with io.atomic_write(path) as f:
        f.write(buffer.getvalue())
