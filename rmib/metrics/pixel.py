"""Pixel confusion counts and the ratios computed from them."""

from __future__ import annotations

import numpy as np


def ratio(numerator, denominator) -> float:
    """numerator / denominator, and 1 when the denominator counts nothing (0/0 is perfect)."""
    return float(numerator) / float(denominator) if denominator else 1.0


def binary(array) -> np.ndarray:
    """A prediction or mask as a 2-D bool array (a trailing channel of 1 dropped)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array > 0 if array.dtype != bool else array


def confusion_counts(pred, truth, mask=None) -> tuple[int, int, int, int]:
    """Pixel counts (tp, fp, fn, tn) of a binary prediction; pixels where mask == 0 are left out.

    Arrays are binary where > 0; ``pixel_metrics(*confusion_counts(...))``.
    """
    pred, truth = binary(pred), binary(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred is {pred.shape} but truth is {truth.shape}")
    if mask is not None:
        keep = binary(mask)
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
        "sensitivity": ratio(tp, tp + fn),
        "ppv": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "specificity": ratio(tn, tn + fp),
    }
