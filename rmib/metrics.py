"""Evaluation metrics computed the way the challenges compute them (NumPy).

- AUPR (IDRiD challenge): average precision, sum over the distinct scores of
  (R_n - R_(n-1)) * P_n with every pixel of every test image pooled, equal to
  scikit-learn's ``average_precision_score``. `aupr` is the exact sort-based
  value; `StreamingAUPR` accumulates per-image histograms of the scores
  quantised to 16 bits, so a test set never sits in memory at once.
- Pixel confusion metrics (`confusion_counts`, `pixel_metrics`).
- Region-level F-score (Zhang et al. 2014, as used by Dual2Net):
  `region_counts`, `region_f_score`, `RegionScore`.
- Grading: `quadratic_kappa`, `binary_classification_report`, and ROC / PR plots.

Conventions for undefined ratios (0/0): a ratio whose denominator counts
nothing that could have gone wrong is 1. Sensitivity with no lesion pixels,
PPV with nothing predicted, specificity with no background, accuracy of an
empty set, and F1 / IoU / region F-score when there is neither lesion nor
prediction are all 1: an empty prediction of an empty mask is perfect.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import cv2
import numpy as np

from rmib.io import atomic_path

QUANTISATION_BINS = 65536  # 16-bit maps, the resolution rmib stores probability maps at
REGION_SIGMAS = (0.2, 0.35, 0.5, 0.65, 0.8)  # Dual2Net's overlap thresholds
_CHUNK = 1 << 22  # pixels per slice when histogramming a large image
# Blending tiles or resizing can put a probability of 1 a few ulps above 1;
# anything further out is a logit or a bug.
_SCORE_TOLERANCE = 1e-4


def _ratio(numerator, denominator) -> float:
    return float(numerator) / float(denominator) if denominator else 1.0


# --------------------------------------------------------------------------- AUPR


def _check_scores(y_score: np.ndarray) -> None:
    if y_score.size and np.issubdtype(y_score.dtype, np.floating):
        low, high = float(np.min(y_score)), float(np.max(y_score))
        if math.isnan(low) or math.isnan(high):
            raise ValueError("y_score contains NaN")
        if low < -_SCORE_TOLERANCE or high > 1.0 + _SCORE_TOLERANCE:
            raise ValueError(
                f"y_score must be probabilities in [0, 1], got values in [{low}, {high}]"
            )


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """AP from cumulative true/false positive counts at decreasing distinct thresholds."""
    if tps.size == 0 or tps[-1] == 0:
        return 0.0  # no lesion pixel: scikit-learn's value
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(max(0.0, np.sum(np.diff(recall, prepend=0.0) * precision)))


def aupr(y_true, y_score) -> float:
    """Average precision of pixel scores, exactly as scikit-learn's ``average_precision_score``.

    AP = sum_n (R_n - R_(n-1)) * P_n over every distinct score, thresholds
    decreasing, all pixels pooled. With no positive pixel the value is 0.0
    (scikit-learn's choice).

    Args:
        y_true: ground truth of any shape, positive where > 0.
        y_score: probabilities in [0, 1], same number of elements.
    """
    y_true = np.asarray(y_true).ravel() > 0
    y_score = np.asarray(y_score).ravel()
    if y_true.size != y_score.size:
        raise ValueError(f"y_true has {y_true.size} values but y_score has {y_score.size}")
    _check_scores(y_score)
    order = np.argsort(y_score, kind="mergesort")[::-1]
    scores = y_score[order]
    hits = y_true[order].astype(np.float64)
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(hits)[last_of_value]
    fps = (last_of_value + 1) - tps
    return _average_precision(tps, fps)


# Thresholds of the Dual2Net authors' AUPR (their scripts/eval_aupr.py): 0, 0.1, ..., 1.0.
AUPR_11PT_STEPS = 10


def _trapezoid_11pt(tps, fps, positives) -> float:
    """Area under the 11-threshold precision-recall polyline (see `aupr_11pt_trapezoid`)."""
    recall, precision = [], []
    for tp, fp in zip(tps, fps, strict=True):
        if positives > 0 and tp + fp > 0:
            recall.append(tp / positives)
            precision.append(tp / (tp + fp))
        else:  # nothing predicted (or nothing to find): the authors' (0, 1)
            recall.append(0.0)
            precision.append(1.0)
    recall.append(0.0)
    precision.append(1.0)
    recall, precision = np.asarray(recall), np.asarray(precision)
    # Recall falls as the threshold rises: integrate from right to left.
    return float(np.sum((recall[:-1] - recall[1:]) * (precision[:-1] + precision[1:]) / 2.0))


def aupr_11pt_trapezoid(y_true, y_score) -> float:
    """The AUPR the Dual2Net authors report: a trapezoid over 11 thresholds, not AP.

    As their `scripts/eval_aupr.py`: for t = 0, 0.1, ..., 1.0 the pixels with
    score > t (all images pooled) give TP and FP; precision TP / (TP + FP) and
    recall TP / P, or precision 1 and recall 0 where nothing is predicted (or
    there is no lesion pixel, P = 0); the point (recall 0, precision 1) is
    appended and the area is the trapezoid rule over recall (their
    `sklearn.metrics.auc`). The curve has 12 points and interpolates linearly
    between them, so it is not average precision (`aupr`, a step sum over every
    distinct score) and either can be the larger on the same map: compare a
    paper's figure only with the metric it was computed with. Their maps are
    8-bit PNGs v in 0..255 thresholded as v > 256 t; here the scores are
    thresholded as they are.

    Args:
        y_true: ground truth of any shape, positive where > 0.
        y_score: probabilities in [0, 1], same number of elements.

    Returns:
        The area, in [0, 1]; 0.0 without lesion pixels.
    """
    y_true = np.asarray(y_true).ravel() > 0
    y_score = np.asarray(y_score).ravel()
    if y_true.size != y_score.size:
        raise ValueError(f"y_true has {y_true.size} values but y_score has {y_score.size}")
    _check_scores(y_score)
    tps, fps = [], []
    for step in range(AUPR_11PT_STEPS + 1):
        predicted = y_score > step / AUPR_11PT_STEPS
        tps.append(int(np.sum(predicted & y_true)))
        fps.append(int(np.sum(predicted & ~y_true)))
    return _trapezoid_11pt(tps, fps, int(np.sum(y_true)))


def quantise_scores(y_score, bins: int = QUANTISATION_BINS) -> np.ndarray:
    """Scores -> integer bins round(score * (bins - 1)).

    Floats must lie in [0, 1] (values within 1e-4 outside are clipped); unsigned integer maps are read as fractions of
    their dtype's maximum (a uint16 map is already quantised for 65536 bins,
    a uint8 map v becomes v * 257).
    """
    y_score = np.asarray(y_score)
    if np.issubdtype(y_score.dtype, np.integer):
        top = np.iinfo(y_score.dtype).max
        if top == bins - 1:
            return y_score.astype(np.int64)
        y_score = y_score.astype(np.float64) / top
    else:
        _check_scores(y_score)
    bins_of = np.rint(y_score.astype(np.float64) * (bins - 1)).astype(np.int64)
    return np.clip(bins_of, 0, bins - 1)


def quantize16(prob) -> np.ndarray:
    """A probability map as uint16, round(p * 65535): how rmib stores maps (16-bit PNG)."""
    return quantise_scores(prob, QUANTISATION_BINS).astype(np.uint16)


class StreamingAUPR:
    """Average precision accumulated image by image from 16-bit score histograms.

    ``result()`` equals scikit-learn's ``average_precision_score`` on the
    quantised scores of all images pooled; memory is two histograms of
    ``bins`` counts whatever the test set's size.

    Args:
        bins: number of quantisation levels (65536 = 16 bits).

    Example:
        >>> acc = StreamingAUPR()
        >>> for truth, prob in test_set:
        ...     acc.update(truth, prob, mask=fov)
        >>> acc.result()
    """

    def __init__(self, bins: int = QUANTISATION_BINS):
        if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        self.bins = int(bins)
        self.positives = np.zeros(self.bins, dtype=np.int64)
        self.negatives = np.zeros(self.bins, dtype=np.int64)

    def update(self, y_true, y_score, mask=None) -> None:
        """Add one image (or batch): truth > 0 is lesion; pixels where mask == 0 are ignored."""
        y_true = np.asarray(y_true)
        y_score = np.asarray(y_score)
        if y_true.size != y_score.size:
            raise ValueError(f"y_true has {y_true.size} values but y_score has {y_score.size}")
        y_true = y_true.reshape(-1)
        y_score = y_score.reshape(-1)
        keep = None
        if mask is not None:
            mask = np.asarray(mask)
            if mask.size != y_true.size:
                raise ValueError(f"mask has {mask.size} values but y_true has {y_true.size}")
            keep = mask.reshape(-1) != 0
        for start in range(0, y_true.size, _CHUNK):
            part = slice(start, start + _CHUNK)
            bins = quantise_scores(y_score[part], self.bins)
            lesion = y_true[part] > 0
            if keep is not None:
                bins, lesion = bins[keep[part]], lesion[keep[part]]
            self.positives += np.bincount(bins[lesion], minlength=self.bins)
            self.negatives += np.bincount(bins[~lesion], minlength=self.bins)

    def merge(self, other: StreamingAUPR) -> None:
        """Add another accumulator's counts (e.g. from a parallel worker)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {other.bins} bins into {self.bins}")
        self.positives += other.positives
        self.negatives += other.negatives

    def _cumulative(self):
        occupied = np.flatnonzero((self.positives + self.negatives)[::-1])
        tps = np.cumsum(self.positives[::-1])[occupied].astype(np.float64)
        fps = np.cumsum(self.negatives[::-1])[occupied].astype(np.float64)
        thresholds = (self.bins - 1 - occupied) / (self.bins - 1)
        return tps, fps, thresholds

    def result(self) -> float:
        """Average precision of everything added so far (0.0 without lesion pixels)."""
        tps, fps, _ = self._cumulative()
        return _average_precision(tps, fps)

    def aupr_11pt_trapezoid(self) -> float:
        """`aupr_11pt_trapezoid` (the Dual2Net authors' AUPR) of everything added so far,
        on the quantised scores: bin b counts as score b / (bins - 1) > t."""
        levels = np.arange(self.bins, dtype=np.int64)
        tps, fps = [], []
        for step in range(AUPR_11PT_STEPS + 1):
            # b / (bins - 1) > step / STEPS, in integers.
            above = levels * AUPR_11PT_STEPS > step * (self.bins - 1)
            tps.append(int(self.positives[above].sum()))
            fps.append(int(self.negatives[above].sum()))
        return _trapezoid_11pt(tps, fps, int(self.positives.sum()))

    def pr_curve(self):
        """(precision, recall, thresholds) in scikit-learn's ``precision_recall_curve`` order.

        Thresholds increase (bin values / (bins - 1)); precision and recall have
        one more entry, the final (1, 0) point.
        """
        tps, fps, thresholds = self._cumulative()
        if tps.size == 0:
            return np.array([1.0]), np.array([0.0]), np.array([])
        precision = tps / (tps + fps)
        recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
        return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


# ------------------------------------------------------------------ pixel metrics


def _binary(array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array > 0 if array.dtype != bool else array


def confusion_counts(pred, truth, mask=None) -> tuple[int, int, int, int]:
    """Pixel counts (tp, fp, fn, tn) of a binary prediction; pixels where mask == 0 are left out.

    Arrays are binary where > 0; ``pixel_metrics(*confusion_counts(...))``.
    """
    pred, truth = _binary(pred), _binary(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred is {pred.shape} but truth is {truth.shape}")
    if mask is not None:
        keep = _binary(mask)
        if keep.shape != pred.shape:
            raise ValueError(f"mask is {keep.shape} but pred is {pred.shape}")
        pred, truth = pred[keep], truth[keep]
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(pred.size - tp - fp - fn)
    return tp, fp, fn, tn


def pixel_metrics(tp, fp, fn, tn) -> dict[str, float]:
    """Sensitivity, PPV, F1, IoU, accuracy and specificity from pixel counts.

    0/0 is 1 (see the module docstring): e.g. F1 = IoU = 1 when there is no
    lesion and none is predicted; F1 = 0 when either side is empty and the other not.
    """
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "ppv": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "specificity": _ratio(tn, tn + fp),
    }


# ---------------------------------------------------------------- region F-score


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return count, labels


def _component_overlap(labels: np.ndarray, count: int, other: np.ndarray) -> np.ndarray:
    """For each component label, |component & other| / |component| (label 0 = background)."""
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count)
    inside = np.bincount(flat, weights=other.ravel().astype(np.float64), minlength=count)
    return inside / np.maximum(area, 1)


class _RegionOverlaps:
    """Connected components of a prediction and a truth, labelled once for all sigmas."""

    def __init__(self, pred, truth):
        self.pred, self.truth = _binary(pred), _binary(truth)
        if self.pred.shape != self.truth.shape or self.pred.ndim != 2:
            raise ValueError(
                f"pred and truth must be (H, W) masks of one size, got "
                f"{self.pred.shape} and {self.truth.shape}"
            )
        self.n_pred, self.pred_labels = _components(self.pred)
        self.n_true, self.true_labels = _components(self.truth)
        self.pred_ratio = _component_overlap(self.pred_labels, self.n_pred, self.truth)
        self.true_ratio = _component_overlap(self.true_labels, self.n_true, self.pred)
        self.both = self.pred & self.truth

    def counts(self, sigma: float) -> tuple[int, int, int]:
        _check_sigma(sigma)
        pred_hit = self.pred_ratio > sigma
        true_hit = self.true_ratio > sigma
        pred_hit[0] = true_hit[0] = False  # label 0 is the background
        pred_miss = ~pred_hit
        true_miss = ~true_hit
        pred_miss[0] = true_miss[0] = False
        tp = self.both | pred_hit[self.pred_labels] | true_hit[self.true_labels]
        fp = pred_miss[self.pred_labels] & ~self.truth
        fn = true_miss[self.true_labels] & ~self.pred
        return int(np.count_nonzero(tp)), int(np.count_nonzero(fp)), int(np.count_nonzero(fn))


def _check_sigma(sigma) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 <= sigma < 1:
        raise ValueError(f"sigma must be an overlap ratio in [0, 1), got {sigma!r}")


def region_counts(pred, true, sigma: float) -> tuple[int, int, int]:
    """Region-level (TP, FP, FN) pixel counts of Zhang et al. 2014 at overlap sigma.

    With C_i the predicted and G_j the true 8-connected components:
    TP = pixels of pred AND truth, plus every pixel of each C_i with
    |C_i & truth| / |C_i| > sigma, plus every pixel of each G_j with
    |G_j & pred| / |G_j| > sigma (a union: no pixel counts twice);
    FP = pixels of C_i \\ truth for each C_i with ratio <= sigma;
    FN = pixels of G_j \\ pred for each G_j with ratio <= sigma.

    Args:
        pred: predicted (H, W) mask, lesion where > 0.
        true: ground-truth (H, W) mask, lesion where > 0.
        sigma: overlap threshold in [0, 1).
    """
    return _RegionOverlaps(pred, true).counts(sigma)


def _f_score(tp: int, fp: int, fn: int) -> dict[str, float]:
    sensitivity, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f = 2 * sensitivity * ppv / (sensitivity + ppv) if sensitivity + ppv else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "sensitivity": sensitivity, "ppv": ppv, "f_score": f}


def region_f_score(pred_mask, true_mask, sigma: float) -> float:
    """Region-level F-score 2 * SN * PPV / (SN + PPV) of one image (see `region_counts`).

    1.0 when neither mask has a lesion pixel.
    """
    return _f_score(*region_counts(pred_mask, true_mask, sigma))["f_score"]


class RegionScore:
    """Region-level F-scores at several sigmas with counts summed over a test set.

    Args:
        sigmas: overlap thresholds (Dual2Net's 0.2 ... 0.8 by default).

    Example:
        >>> score = RegionScore()
        >>> for pred, truth in test_set:
        ...     score.update(pred, truth)
        >>> score.result()[0.5]["f_score"]
    """

    def __init__(self, sigmas=REGION_SIGMAS):
        self.sigmas = tuple(float(s) for s in sigmas)
        for sigma in self.sigmas:
            _check_sigma(sigma)
        self.counts = {sigma: np.zeros(3, dtype=np.int64) for sigma in self.sigmas}

    def update(self, pred, true, mask=None) -> None:
        """Add one image; with a mask, pixels where mask == 0 count as background in both."""
        pred, true = _binary(pred), _binary(true)
        if mask is not None:
            keep = _binary(mask)
            pred, true = pred & keep, true & keep
        overlaps = _RegionOverlaps(pred, true)
        for sigma in self.sigmas:
            self.counts[sigma] += overlaps.counts(sigma)

    def f_score(self, sigma: float) -> float:
        """The F-score at one of the accumulator's sigmas."""
        if float(sigma) not in self.counts:
            raise ValueError(f"sigma {sigma} is not one of {self.sigmas}")
        return _f_score(*(int(c) for c in self.counts[float(sigma)]))["f_score"]

    def result(self) -> dict[float, dict[str, float]]:
        """{sigma: {"tp", "fp", "fn", "sensitivity", "ppv", "f_score"}}."""
        return {sigma: _f_score(*(int(c) for c in self.counts[sigma])) for sigma in self.sigmas}


# ------------------------------------------------------------------------ grading


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


__all__ = [
    "REGION_SIGMAS",
    "RegionScore",
    "StreamingAUPR",
    "aupr",
    "binary_classification_report",
    "confusion_counts",
    "pixel_metrics",
    "quadratic_kappa",
    "quantise_scores",
    "quantize16",
    "region_counts",
    "region_f_score",
    "save_pr_curve",
    "save_pr_curve_from_stream",
    "save_roc_curve",
]
