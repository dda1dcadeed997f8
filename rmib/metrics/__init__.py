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

One module each (`precision_recall`, `pixel`, `region`, `grading`); every
public name is re-exported here.

Conventions for undefined ratios (0/0): a ratio whose denominator counts
nothing that could have gone wrong is 1. Sensitivity with no lesion pixels,
PPV with nothing predicted, specificity with no background, accuracy of an
empty set, and F1 / IoU / region F-score when there is neither lesion nor
prediction are all 1: an empty prediction of an empty mask is perfect.
"""

from rmib.choices import REGION_SIGMAS
from rmib.metrics.grading import (
    binary_classification_report,
    quadratic_kappa,
    save_pr_curve,
    save_pr_curve_from_stream,
    save_roc_curve,
)
from rmib.metrics.pixel import confusion_counts, pixel_metrics
from rmib.metrics.precision_recall import (
    QUANTISATION_BINS,
    StreamingAUPR,
    aupr,
    aupr_11pt_trapezoid,
    quantise_scores,
    quantize16,
)
from rmib.metrics.region import RegionScore, region_counts, region_f_score

__all__ = [
    "QUANTISATION_BINS",
    "REGION_SIGMAS",
    "RegionScore",
    "StreamingAUPR",
    "aupr",
    "aupr_11pt_trapezoid",
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
