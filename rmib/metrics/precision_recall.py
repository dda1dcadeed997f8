"""Area under the precision-recall curve as the IDRiD challenge computes it, exact
(`aupr`) or streamed over per-image histograms (`StreamingAUPR`)."""

from __future__ import annotations

import math
import numbers

import numpy as np

QUANTISATION_BINS = 65536  # 16-bit maps, the resolution rmib stores probability maps at
_CHUNK = 1 << 22  # pixels per slice when histogramming a large image
# Blending tiles or resizing can put a probability of 1 a few ulps above 1;
# anything further out is a logit or a bug.
_SCORE_TOLERANCE = 1e-4


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
