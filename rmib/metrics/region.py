"""Region-level F-score (Zhang et al. 2014, as used by Dual2Net)."""

from __future__ import annotations

import numbers

import cv2
import numpy as np

from rmib.choices import REGION_SIGMAS
from rmib.metrics.pixel import binary, ratio


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
        self.pred, self.truth = binary(pred), binary(truth)
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
    sensitivity, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
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
        pred, true = binary(pred), binary(true)
        if mask is not None:
            keep = binary(mask)
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
