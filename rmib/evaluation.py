"""THE whole-image evaluation: pooled AUPR and pixel metrics of a Segmenter over photographs.

Validation during training (`WholeImageValidation`), the final validation of a
run and `rmib evaluate` score photographs the same way: predicted whole as in
production, pooled over every pixel (streaming AUPR), thresholded pixel counts.
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


def evaluate_examples(segmenter, examples, threshold=0.5, fov_only=False):
    """AUPR (pooled, streaming) and pixel metrics at `threshold` over whole images."""
    aupr = metrics.StreamingAUPR()
    totals = np.zeros(4, np.int64)
    for example in examples:
        truth = np.asarray(example.mask)
        fov = np.asarray(example.fov)
        prob = segmenter.predict_prepared(np.asarray(example.image), fov)
        region = fov if fov_only else None
        aupr.update(truth, prob, mask=region)
        totals += np.asarray(metrics.confusion_counts(prob >= threshold, truth, mask=region))
    return {"aupr": aupr.result(), **metrics.pixel_metrics(*totals)}
