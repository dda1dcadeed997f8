"""`rmib predict` and `rmib evaluate`: whole photographs through a segmenter."""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import click
import numpy as np

from rmib import io, metrics, report
from rmib.data import readers
from rmib.data.pipeline import PreprocessedCache, whole_images
from rmib.errors import BadInputError, RmibError
from rmib.evaluation import WholeImageScores, score_examples

# What `predict_files` writes for each photograph, after its output stem.
OUTPUT_SUFFIXES = ("_prob.png", "_mask.png", "_overlay.png")
PREDICTIONS_CSV = "predictions.csv"


def collect_images(inputs, out=None) -> list[Path]:
    """Image files named directly or found (non-recursively) in the folders named.

    A file named twice (a folder and a file in it) is kept once. Files in
    the folder `out` named like `predict_files`' own outputs (<stem>_prob.png,
    _mask.png, _overlay.png) are left out, so that predicting a folder into
    itself twice never reads the first run's maps back as photographs.
    """
    own_outputs = Path(out).resolve() if out is not None else None

    def is_output(path: Path) -> bool:
        return (
            own_outputs is not None
            and path.name.endswith(OUTPUT_SUFFIXES)
            and path.parent.resolve() == own_outputs
        )

    paths, seen = [], set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.is_file() and io.is_image_file(p))
            found = [p for p in images if not is_output(p)]
            if not found:
                left_out = " (only outputs of rmib predict)" if images else ""
                raise RmibError(f"{item}: no image files in this folder{left_out}")
        elif item.exists():
            found = [] if is_output(item) else [item]
        else:
            raise RmibError(f"{item}: no such file or folder")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    if not paths:
        raise RmibError(
            f"no photograph to predict: {', '.join(map(str, inputs))} "
            "named only outputs of rmib predict"
        )
    return paths


def output_stems(paths) -> list[str]:
    """The name each photograph's outputs start with: its stem, numbered when stems collide.

    Photographs whose stems are the same (a/photo.jpg and b/photo.png; case is
    ignored, as some file systems do) are named <stem>-1, <stem>-2 ... in the
    order given, so none overwrites another's outputs; predictions.csv says
    which is which.
    """
    counts = collections.Counter(Path(p).stem.casefold() for p in paths)
    used = {stem for stem, n in counts.items() if n == 1}
    numbers = collections.Counter()
    stems = []
    for path in paths:
        stem = Path(path).stem
        if counts[stem.casefold()] > 1:
            while True:
                numbers[stem.casefold()] += 1
                candidate = f"{stem}-{numbers[stem.casefold()]}"
                if candidate.casefold() not in used:
                    break
            stem = candidate
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def check_threshold(threshold) -> float:
    """The probability threshold of a binary mask, refused outside (0, 1)."""
    if isinstance(threshold, bool) or not 0.0 < float(threshold) < 1.0:
        raise RmibError(f"--threshold must be in (0, 1), got {threshold!r}")
    return float(threshold)


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


def predict_files(segmenter, inputs, out, threshold=0.5, on_bad="error", echo=click.echo):
    """Predict every image; write <stem>_prob.png (16-bit), <stem>_mask.png, <stem>_overlay.png.

    Photographs sharing a stem are numbered (`output_stems`); files in `out`
    named like these outputs are not read as photographs (`collect_images`).
    `out`/predictions.csv (rewritten atomically after each photograph) has
    one row per photograph predicted: input (the path as given), prob, mask,
    overlay (file names in `out`), lesion_pixels (of the mask) and
    mean_probability (over the whole photograph).

    Returns:
        (list of output stems written, list of (file, reason) skipped)
    """
    threshold = check_threshold(threshold)
    out = Path(out)
    paths = collect_images(inputs, out=out)
    stems = output_stems(paths)
    numbered = [f"{p} -> {s}" for p, s in zip(paths, stems, strict=True) if p.stem != s]
    if numbered:
        echo(f"photographs sharing a name are numbered: {'; '.join(numbered)}")
    out.mkdir(parents=True, exist_ok=True)
    done, problems, rows = [], [], []
    colour = report.LESION_COLOURS.get(segmenter.lesion, (255, 255, 0))
    pairs = list(zip(paths, stems, strict=True))
    with click.progressbar(pairs, label="Predicting", file=click.get_text_stream("stderr")) as bar:
        for path, stem in bar:
            try:
                image = io.read_image(path)
            except BadInputError as exc:
                if on_bad != "skip":
                    raise
                problems.append((exc.path, exc.reason))
                continue
            lesion_pixels, mean = _predict_and_write(segmenter, image, out, stem, threshold, colour)
            done.append(stem)
            names = [f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]
            rows.append(
                {
                    "input": str(path),
                    **dict(zip(("prob", "mask", "overlay"), names, strict=True)),
                    "lesion_pixels": lesion_pixels,
                    "mean_probability": f"{mean:.6g}",
                }
            )
            io.write_csv(out / PREDICTIONS_CSV, rows)
    if problems:
        io.write_skipped(out, problems)
        if not done:
            raise RmibError(f"no image could be read; see {out / 'skipped.csv'}")
    return done, problems


def _predict_and_write(segmenter, image, out: Path, stem: str, threshold, colour):
    """Predict one photograph; write <stem>_prob.png, _mask.png and _overlay.png.

    Memory: beyond the photograph and the maps written, only strips of
    temporaries (the float overlay blend, the quantisation) and a copy for
    encoding; the probability map is released once the overlay is blended.

    Returns:
        (lesion pixels of the mask, mean probability over the photograph)
    """
    prob = segmenter.predict(image)
    save_probability_png(out / f"{stem}_prob.png", prob)
    mean = float(np.mean(prob, dtype=np.float64))
    mask = np.greater_equal(prob, threshold).view(np.uint8)  # 0/1 without a copy
    lesion_pixels = int(np.count_nonzero(mask))
    io.write_image(out / f"{stem}_mask.png", mask * np.uint8(255))
    blend = functools.partial(report.probability_overlay, colour=colour)
    overlay = _by_strips(blend, image, np.empty(image.shape, np.uint8), prob)
    del prob
    overlay = report.mask_outline_overlay(overlay, mask, colour)
    io.write_image(out / f"{stem}_overlay.png", overlay)
    return lesion_pixels, mean


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
    threshold = check_threshold(threshold)
    records = evaluation_records(data_roots, lesion, split=split, names=names, on_bad=on_bad)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    cache = PreprocessedCache(cache_dir)
    examples = whole_images(records, lesion, segmenter.preprocessing, cache, on_bad, problems)

    def each(example, prob, pred, counts):
        truth = np.asarray(example.mask)
        row = {"image": example.name, "lesion_pixels": int(truth.sum())}
        single = metrics.StreamingAUPR()
        single.update(truth, prob, mask=np.asarray(example.fov) if fov_only else None)
        row["aupr"] = single.result() if truth.any() else float("nan")
        row.update(metrics.pixel_metrics(*counts))
        rows.append(row)
        if overlays:
            io.write_image(
                out / "overlays" / f"{example.name}_compare.png", report.comparison_map(pred, truth)
            )

    with click.progressbar(
        examples, length=len(records), label="Evaluating", file=click.get_text_stream("stderr")
    ) as bar:
        scores = WholeImageScores(threshold, fov_only, regions=True)
        score_examples(segmenter, bar, scores, each=each)
    if not rows:
        raise RmibError("no image could be evaluated")
    # "aupr_11pt_trapezoid" is the Dual2Net authors' AUPR, to compare with their figures.
    result = {
        "lesion": lesion,
        "images": len(rows),
        "threshold": threshold,
        "fov_only": fov_only,
        **scores.result(),
    }
    io.write_json(out / "metrics.json", result)
    io.write_csv(out / "per_image.csv", rows)
    metrics.save_pr_curve_from_stream(scores.aupr, out / "pr_curve.png", title=f"{lesion} PR curve")
    if problems:
        io.write_skipped(out, problems)
    return result


def evaluation_records(data_roots, lesion, *, split=None, names=None, on_bad="error") -> list:
    """The records of `data_roots` annotated for `lesion`, of `split` and `names` when given.

    Raises:
        RmibError: a split or names that no dataset has (the message lists
            the valid ones), every mask of the lesion in a dataset all zero
            (`readers.require_lesion_pixels`), or no image left.
    """
    records, everything = [], []
    for root in data_roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        annotated = dataset.with_lesion(lesion)
        readers.require_lesion_pixels(annotated, lesion, root)
        records += annotated
        everything += dataset.records
    where = ", ".join(map(str, data_roots))
    if split:
        splits = sorted({r.split for r in everything if r.split is not None})
        if split not in splits:
            valid = f"its splits are: {', '.join(splits)}" if splits else "it has no splits"
            raise RmibError(f"--split {split!r}: no such split in {where}; {valid}")
        records = [r for r in records if r.split == split]
    if names:
        known = {r.name for r in everything}
        unknown = [n for n in dict.fromkeys(names) if n not in known]
        if unknown:
            some = sorted(r.name for r in records) or sorted(known)
            shown = ", ".join(some[:5]) + (", ..." if len(some) > 5 else "")
            raise RmibError(
                f"--names: no image named {', '.join(map(repr, unknown))} in {where} "
                f"(images there include {shown})"
            )
        wanted = set(names)
        records = [r for r in records if r.name in wanted]
    if not records:
        raise RmibError(
            f"no image in {where} is annotated for {lesion}"
            + (f" in split {split!r}" if split else "")
            + (f" among --names {', '.join(names)}" if names else "")
        )
    return records
