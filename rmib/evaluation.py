"""THE whole-image evaluation: pooled AUPR, pixel and region scores of a Segmenter over photographs.

Validation during training (`WholeImageValidation`), the final validation of
every method's run and `rmib evaluate` score photographs the same way
(`evaluate_examples`, `WholeImageScores`): predicted whole as in production,
pooled over every pixel (streaming AUPR), thresholded pixel counts, region F.
"""

from __future__ import annotations

import keras
import numpy as np

from rmib import metrics
from rmib.errors import RmibError


class WholeImageValidation(keras.callbacks.Callback):
    """Validation metrics on held-out whole photographs, predicted as in production.

    Adds `val_aupr`, `val_f1`, `val_iou`, `val_sensitivity` and `val_ppv` to
    the epoch's logs every `every` epochs and at the last epoch (the last of
    `epochs`, or one that a time limit of `rmib.training` makes the last: it
    sets `stop_training` before this runs). Epochs in between log NaN (not
    computed: they never count as an improvement of a monitor, and the
    history shows which epochs were validated). It must run before the
    checkpoint callback so that the best checkpoint sees them. `results`
    keeps every validated epoch's full metrics (`evaluate_examples`), by
    1-based epoch, so the caller need not predict them again.

    Args:
        examples: preprocessed validation `Example`s (image, mask, fov).
        make_segmenter: model -> `rmib.inference.segmenter.Segmenter`.
        every: compute every this many epochs (and always at the last epoch).
        threshold: the threshold of the pixel metrics.
        epochs: the number of epochs of the fit, if known.
    """

    KEYS = ("aupr", "f1", "iou", "sensitivity", "ppv")

    def __init__(self, examples, make_segmenter, every=1, threshold=0.5, epochs=None):
        super().__init__()
        self.examples = examples
        self.make_segmenter = make_segmenter
        self.every = every
        self.threshold = threshold
        self.epochs = epochs
        self.results: dict[int, dict] = {}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        last_epoch = (self.epochs is not None and epoch + 1 >= self.epochs) or bool(
            getattr(self.model, "stop_training", False)
        )
        if (epoch + 1) % self.every and not last_epoch:
            logs.update({f"val_{k}": float("nan") for k in self.KEYS})
            return
        result = evaluate_examples(
            self.make_segmenter(self.model), self.examples, threshold=self.threshold
        )
        self.results[epoch + 1] = result
        logs.update({f"val_{k}": result[k] for k in self.KEYS})


def final_validation(run, phase, callback, evaluate):
    """The validation metrics of the weights a fit ended with, reusing `callback`'s.

    `training.fit` ends with the best epoch's weights, or the last epoch's
    (metrics.json "weights" of `phase`, the phase given to fit, or None).
    When `callback` validated that epoch in this process, its metrics are
    returned; otherwise `evaluate()` computes them (a resumed run, a worker's
    copy of the run).
    """
    try:
        training_metrics = run.read_metrics()["training" if phase is None else f"training_{phase}"]
        key = "best_epoch" if training_metrics["weights"] == "best" else "epochs_trained"
        epoch = int(training_metrics[key])
    except (KeyError, TypeError, ValueError, OSError, RmibError):
        return evaluate()
    if callback is not None and epoch in callback.results:
        return dict(callback.results[epoch])
    return evaluate()


class WholeImageScores:
    """The scores of whole photographs, pooled over every pixel of every photograph.

    "aupr" (`metrics.StreamingAUPR`: average precision, the IDRiD challenge's
    AUPR) and the pixel metrics of ``prob >= threshold`` (counts summed over
    the photographs); with `regions`, also "aupr_11pt_trapezoid" (the Dual2Net
    authors' AUPR) and "region_f_score" {sigma: F} (`metrics.RegionScore` at
    `metrics.REGION_SIGMAS`). With `fov_only`, AUPR and pixel counts see only
    the field of view (region scores always see the whole photograph).
    """

    def __init__(self, threshold: float = 0.5, fov_only: bool = False, regions: bool = False):
        self.threshold = threshold
        self.fov_only = fov_only
        self.aupr = metrics.StreamingAUPR()
        self.regions = metrics.RegionScore(metrics.REGION_SIGMAS) if regions else None
        self.totals = np.zeros(4, np.int64)  # tp, fp, fn, tn

    def add(self, truth: np.ndarray, prob: np.ndarray, fov: np.ndarray | None = None):
        """Add one photograph; returns (its thresholded map, its confusion counts)."""
        region = fov if self.fov_only else None
        self.aupr.update(truth, prob, mask=region)
        pred = prob >= self.threshold
        counts = metrics.confusion_counts(pred, truth, mask=region)
        self.totals += np.asarray(counts, np.int64)
        if self.regions is not None:
            self.regions.update(pred, truth)
        return pred, counts

    def result(self) -> dict:
        result = {"aupr": self.aupr.result()}
        if self.regions is not None:
            result["aupr_11pt_trapezoid"] = self.aupr.aupr_11pt_trapezoid()
        result.update(metrics.pixel_metrics(*(int(t) for t in self.totals)))
        if self.regions is not None:
            sigmas = metrics.REGION_SIGMAS
            result["region_f_score"] = {str(s): self.regions.f_score(s) for s in sigmas}
        return result


def score_examples(segmenter, examples, scores: WholeImageScores, each=None) -> WholeImageScores:
    """Predict every example whole, as in production, and add it to `scores`.

    Args:
        segmenter: a `rmib.inference.segmenter.Segmenter`.
        examples: preprocessed `Example`s (image, mask, fov, name).
        scores: the `WholeImageScores` to add to (returned).
        each: called as ``each(example, prob, pred, counts)`` after each photograph
            (`rmib evaluate` writes its per-image rows and overlays there).
    """
    for example in examples:
        truth = np.asarray(example.mask)
        fov = np.asarray(example.fov)
        prob = segmenter.predict_prepared(np.asarray(example.image), fov)
        pred, counts = scores.add(truth, prob, fov)
        if each is not None:
            each(example, prob, pred, counts)
    return scores


def evaluate_examples(segmenter, examples, threshold=0.5, fov_only=False, regions=False) -> dict:
    """The `WholeImageScores` of `examples` predicted whole by `segmenter` (`score_examples`)."""
    scores = WholeImageScores(threshold, fov_only, regions)
    return score_examples(segmenter, examples, scores).result()
