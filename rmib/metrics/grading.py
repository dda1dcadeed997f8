"""Metrics of image-level grading: quadratic kappa, the binary report, ROC and PR plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rmib.io import atomic_path
from rmib.metrics.pixel import confusion_counts, pixel_metrics
from rmib.metrics.precision_recall import StreamingAUPR, aupr


def quadratic_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Quadratic weighted Cohen's kappa of integer grades 0 .. num_classes - 1.

    kappa = 1 - sum(W * O) / sum(W * E), W_ij = (i - j)^2 / (K - 1)^2, O the
    confusion matrix and E the outer product of its marginals / n. Weights use
    the grade values, so a class absent from both still counts in the distance.
    NaN when undefined (every grade, true and predicted, is one same class).

    Args:
        y_true: true grades.
        y_pred: predicted grades.
        num_classes: K; by default 1 + the largest grade seen.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.size != y_pred.size:
        raise ValueError(f"y_true has {y_true.size} grades but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("quadratic_kappa needs at least one grade")
    for name, grades in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.all(np.equal(np.mod(grades, 1), 0)) or grades.min() < 0:
            raise ValueError(f"{name} must hold non-negative integer grades")
    y_true, y_pred = y_true.astype(np.int64), y_pred.astype(np.int64)
    seen = int(max(y_true.max(), y_pred.max())) + 1
    k = seen if num_classes is None else int(num_classes)
    if k < seen:
        raise ValueError(f"num_classes={num_classes} but a grade of {seen - 1} was seen")
    observed = np.zeros((k, k), dtype=np.float64)
    np.add.at(observed, (y_true, y_pred), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / y_true.size
    index = np.arange(k)
    weights = (index[:, None] - index[None, :]) ** 2 / max(k - 1, 1) ** 2
    chance = float(np.sum(weights * expected))
    if chance == 0.0:
        return float("nan")
    return 1.0 - float(np.sum(weights * observed)) / chance


def binary_classification_report(y_true, y_prob, threshold: float = 0.5) -> dict:
    """Accuracy, recall, precision, specificity, ROC AUC and confusion matrix of a binary classifier.

    ``confusion_matrix`` is [[tn, fp], [fn, tp]]; ``roc_auc`` is NaN when only
    one class is present. Ratios follow the module's 0/0 = 1 convention.
    JSON-serialisable.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).ravel() > 0
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if y_true.size != y_prob.size:
        raise ValueError(f"y_true has {y_true.size} labels but y_prob has {y_prob.size}")
    tp, fp, fn, tn = confusion_counts(y_prob >= threshold, y_true)
    stats = pixel_metrics(tp, fp, fn, tn)
    if 0 < np.count_nonzero(y_true) < y_true.size:
        roc_auc = float(roc_auc_score(y_true, y_prob))
    else:
        roc_auc = float("nan")
    return {
        "n": int(y_true.size),
        "threshold": float(threshold),
        "accuracy": stats["accuracy"],
        "recall": stats["sensitivity"],
        "precision": stats["ppv"],
        "specificity": stats["specificity"],
        "f1": stats["f1"],
        "roc_auc": roc_auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _save_curve(x, y, path, xlabel, ylabel, title, label, step=False, diagonal=False) -> Path:
    # The object-oriented API draws with Agg without touching pyplot's global
    # backend, so a notebook's inline plots keep working.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if step:
        axes.step(x, y, where="post", label=label)
    else:
        axes.plot(x, y, label=label)
    if diagonal:
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title or "")
    axes.legend(loc="lower right" if diagonal else "lower left")
    axes.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path


def save_roc_curve(y_true, y_prob, path, title: str | None = None) -> Path:
    """Plot the ROC curve with its AUC to an image file (PNG by suffix), atomically."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true).ravel() > 0
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    fpr, tpr, _ = roc_curve(y_true, y_prob)
    label = f"AUC = {roc_auc_score(y_true, y_prob):.4f}"
    return _save_curve(
        fpr, tpr, path, "False positive rate", "True positive rate", title, label, diagonal=True
    )


def save_pr_curve(y_true, y_prob, path, title: str | None = None) -> Path:
    """Plot the precision-recall curve with its average precision to an image file, atomically."""
    from sklearn.metrics import precision_recall_curve

    y_true = np.asarray(y_true).ravel() > 0
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    precision, recall, _ = precision_recall_curve(y_true, y_prob)
    label = f"AP = {aupr(y_true, y_prob):.4f}"
    return _save_curve(recall, precision, path, "Recall", "Precision", title, label, step=True)


def save_pr_curve_from_stream(accumulator: StreamingAUPR, path, title: str | None = None) -> Path:
    """Plot a `StreamingAUPR`'s precision-recall curve with its AP to an image file, atomically."""
    precision, recall, _ = accumulator.pr_curve()
    label = f"AP = {accumulator.result():.4f}"
    return _save_curve(recall, precision, path, "Recall", "Precision", title, label, step=True)
