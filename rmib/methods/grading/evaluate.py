"""Evaluation of a trained patch-grid DR grader (Yang et al., MICCAI 2017): `rmib grade evaluate`.

Patch level (images with MA/HE/EX masks): confusion matrix, per-class recall
and precision, lesion-vs-normal ROC AUC. Image level (graded images):
quadratic weighted kappa, accuracy, any-DR and referable-DR ROC AUC, the
weighted lesion map's global net beside the plain baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rmib import io, metrics
from rmib.choices import EVALUATION_SPLITS
from rmib.data import readers
from rmib.errors import RmibError
from rmib.methods.grading.data import (
    guarded,
    load_prepared,
    read_grading_data,
    read_masks,
    roots_text,
    with_progress,
)
from rmib.methods.grading.grader import Grader
from rmib.methods.grading.lesion_map import predict_lesion_map
from rmib.methods.grading.patches import EXCLUDED, PATCH_CLASSES, patch_labels_from_masks

REFERABLE_GRADE = 2  # referable DR: moderate NPDR or worse (Yang et al., Sec. IV-E)


def _ratio(numerator, denominator) -> float:
    # rmib's convention (rmib.metrics): 0/0 is 1; the counts beside it say when that happened.
    return float(numerator) / float(denominator) if denominator else 1.0


def patch_report(true_labels, class_probs) -> dict:
    """Patch-level metrics of the local net (Yang et al., Table V, Fig. 5 and Fig. 6).

    Args:
        true_labels: (N,) patch labels 0..3 (excluded patches already left out).
        class_probs: (N, 4) softmax of the local net.

    Returns:
        confusion_matrix [true][predicted], accuracy, per-class recall,
        precision, support (true patches) and predicted count, and
        lesion_vs_normal: `rmib.metrics.binary_classification_report` of
        lesion (label > 0) against normal with score 1 - P(normal).
    """
    true_labels = np.asarray(true_labels, np.int64)
    class_probs = np.asarray(class_probs, np.float64)
    k = len(PATCH_CLASSES)
    predicted = class_probs.argmax(axis=1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true_labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(PATCH_CLASSES):
        per_class[name] = {
            "recall": _ratio(confusion[c, c], confusion[c].sum()),
            "precision": _ratio(confusion[c, c], confusion[:, c].sum()),
            "support": int(confusion[c].sum()),
            "predicted": int(confusion[:, c].sum()),
        }
    return {
        "patches": int(true_labels.size),
        "classes": list(PATCH_CLASSES),
        "confusion_matrix": confusion.tolist(),
        "accuracy": _ratio(np.trace(confusion), confusion.sum()),
        "per_class": per_class,
        "lesion_vs_normal": metrics.binary_classification_report(
            true_labels > 0, 1.0 - class_probs[:, 0]
        ),
    }


def grading_report(true_grades, probs, num_classes: int) -> dict:
    """Image-level metrics of a global net (Yang et al., Sec. IV-E).

    Args:
        true_grades: (N,) grades 0..num_classes-1.
        probs: (N, num_classes) softmax of the global net.

    Returns:
        quadratic weighted kappa (`rmib.metrics.quadratic_kappa`; NaN when
        undefined), accuracy, confusion matrix, and two binary reports
        (`rmib.metrics.binary_classification_report`, ROC AUC NaN with one
        class only): any_dr (grade >= 1, score 1 - P(grade 0)) and
        referable_dr (grade >= 2, score P(grade >= 2)).
    """
    true_grades = np.asarray(true_grades, np.int64)
    probs = np.asarray(probs, np.float64)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (true_grades, predicted), 1)
    return {
        "images": int(true_grades.size),
        "kappa": metrics.quadratic_kappa(true_grades, predicted, num_classes=num_classes),
        "accuracy": float(np.mean(true_grades == predicted)),
        "confusion_matrix": confusion.tolist(),
        "any_dr": metrics.binary_classification_report(true_grades >= 1, 1.0 - probs[:, 0]),
        "referable_dr": metrics.binary_classification_report(
            true_grades >= REFERABLE_GRADE, probs[:, REFERABLE_GRADE:].sum(axis=1)
        ),
    }


METRIC_NOTES = {
    "null": "an undefined value: quadratic kappa when every true and predicted grade is one "
    "same class; ROC AUC when the images (or patches) hold only one class",
    "ratios": "recall/precision with nothing to count (0/0) are 1, as everywhere in rmib; "
    "'support' and 'predicted' give the counts",
    "lesion_vs_normal": "patches: lesion (MA, HE or EX) against normal, score 1 - P(normal)",
    "any_dr": "images: grade >= 1 against grade 0, score 1 - P(grade 0)",
    "referable_dr": "images: grade >= 2 (moderate NPDR or worse) against grades 0-1, "
    "score P(grade >= 2)",
}


def resolve_split(roots, split: str = "auto", on_bad: str = "error") -> str | None:
    """The split `rmib grade evaluate --split` means: "auto" is "test" when a tree has one
    (it was held out of training), else None (every image), as is "all"."""
    if split == "all":
        return None
    if split != "auto":
        return split
    for root in roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        if any(r.split == "test" for r in dataset.records):
            return "test"
    return None


def evaluate_grader(
    grader: Grader,
    roots,
    out,
    *,
    split: str = "auto",
    on_bad: str = "error",
    cache_dir=None,
    echo: Callable[[str], None] = print,
    progress=None,
) -> dict:
    """Evaluate a grader: patch level on images with masks, image level on graded images.

    Writes metrics.json (NaN written as null, see its "notes"), per_image.csv,
    and ROC curves (patch_roc.png; referable_roc_weighted.png and
    referable_roc_plain.png) to `out`.

    Args:
        grader: a loaded `Grader`.
        roots: dataset folders.
        out: output folder.
        split: "auto" (the trees' "test" split when they have one, else all
            images), "all", or one split name.

    Raises:
        RmibError: no image with MA/HE/EX masks and no graded image in the roots.
    """
    if split not in EVALUATION_SPLITS:
        raise RmibError(f"unknown split {split!r}; expected one of {', '.join(EVALUATION_SPLITS)}")
    roots = [Path(r) for r in roots]
    out = Path(out)
    chosen = resolve_split(roots, split, on_bad)
    data = read_grading_data(roots, grader.num_classes, split=chosen, on_bad=on_bad)
    where = f" in split {chosen!r}" if chosen else ""
    if not data.masked and not data.graded:
        raise RmibError(
            f"nothing to evaluate in {roots_text(roots)}{where}: expected images with lesion "
            "masks for all of MA, HE and EX (patch level) or graded images (image level)"
        )
    out.mkdir(parents=True, exist_ok=True)
    problems = list(data.problems)
    result = {
        "run_metadata": {
            k: grader.metadata.get(k)
            for k in ("image_size", "patch_size", "overlap", "grades", "global_net", "global_size")
        },
        "data": [str(r) for r in roots],
        "split": chosen or "all",
        "notes": METRIC_NOTES,
        "patch": None,  # stays None when no image could be read for it
        "image": None,
    }

    if data.masked:
        true, scores, excluded, images = [], [], 0, 0
        prep = grader.preprocessing
        for _, (masks, image) in guarded(
            with_progress(progress, data.masked, "Patches"),
            lambda r: (read_masks(r, prep), load_prepared(r, prep, cache_dir)),
            on_bad,
            problems,
        ):
            labels = patch_labels_from_masks(
                masks, grader.image_size, grader.patch_size, grader.overlap, grader.min_pixels
            ).reshape(-1)
            found = predict_lesion_map(
                grader.local_net, image, grader.patch_size, grader.overlap, grader.batch_size
            )
            keep = labels != EXCLUDED
            excluded += int(np.count_nonzero(~keep))
            true.append(labels[keep])
            scores.append(found.class_probs[keep])
            images += 1
        if images:
            true, scores = np.concatenate(true), np.concatenate(scores)
            result["patch"] = {
                "images": images,
                "excluded_soft_exudate_only": excluded,
                **patch_report(true, scores),
            }
            if 0 < np.count_nonzero(true) < true.size:
                metrics.save_roc_curve(
                    true > 0,
                    1.0 - scores[:, 0],
                    out / "patch_roc.png",
                    title="Lesion vs normal patches",
                )
    else:
        echo(f"no image{where} has MA/HE/EX masks: patch-level metrics skipped")

    if data.graded:
        rows, grades, weighted, plain = [], [], [], []
        for record, image in guarded(
            with_progress(progress, data.graded, "Grading"),
            lambda r: load_prepared(r, grader.preprocessing, cache_dir),
            on_bad,
            problems,
        ):
            graded = grader.grade_prepared(image)
            grades.append(record.grade)
            weighted.append(graded.probs)
            row = {"image": str(record.image), "grade": record.grade, "weighted": graded.grade}
            if graded.plain_probs is not None:
                plain.append(graded.plain_probs)
                row["plain"] = graded.plain_grade
            row.update(
                {f"weighted_prob_{g}": round(float(p), 6) for g, p in enumerate(graded.probs)}
            )
            rows.append(row)
        if rows:
            image_level = {"left_out_grades": data.left_out_grades}
            for name, probs in (("weighted", weighted), ("plain", plain)):
                if not probs:
                    continue
                image_level[name] = grading_report(grades, np.stack(probs), grader.num_classes)
                y = np.asarray(grades) >= REFERABLE_GRADE
                if 0 < np.count_nonzero(y) < y.size:
                    metrics.save_roc_curve(
                        y,
                        np.stack(probs)[:, REFERABLE_GRADE:].sum(axis=1),
                        out / f"referable_roc_{name}.png",
                        title=f"Referable DR, {name}",
                    )
            result["image"] = image_level
            io.write_csv(out / "per_image.csv", rows)
    else:
        echo(f"no graded image{where}: image-level metrics skipped")

    if problems:
        io.write_skipped(out, problems)
    io.write_json(out / "metrics.json", result)
    return result


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"


def format_metrics(result: dict) -> str:
    """The small table `rmib grade evaluate` prints: weighted vs non-weighted, then patches."""
    lines = []
    image = result.get("image")
    if image:
        columns = [c for c in ("weighted", "plain") if c in image]
        n = image[columns[0]]["images"]
        lines.append(f"Image level ({n} graded images, split {result['split']})")
        lines.append(f"  {'':<34}" + "".join(f"{c:>10}" for c in columns))
        for label, get in (
            ("quadratic weighted kappa", lambda r: r["kappa"]),
            ("accuracy", lambda r: r["accuracy"]),
            ("any-DR ROC AUC (grade >= 1)", lambda r: r["any_dr"]["roc_auc"]),
            ("referable-DR ROC AUC (grade >= 2)", lambda r: r["referable_dr"]["roc_auc"]),
        ):
            lines.append(
                f"  {label:<34}" + "".join(f"{_number(get(image[c])):>10}" for c in columns)
            )
    patch = result.get("patch")
    if patch:
        lines.append(
            f"Patch level ({patch['patches']} patches from {patch['images']} images with masks)"
        )
        lines.append(f"  {'class':<8}{'recall':>10}{'precision':>11}{'patches':>9}")
        for name, row in patch["per_class"].items():
            lines.append(
                f"  {name:<8}{_number(row['recall']):>10}{_number(row['precision']):>11}"
                f"{row['support']:>9}"
            )
        auc = _number(patch["lesion_vs_normal"]["roc_auc"])
        lines.append(f"  lesion-vs-normal ROC AUC: {auc}")
    return "\n".join(lines)
