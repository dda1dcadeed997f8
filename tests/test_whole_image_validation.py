"""WholeImageValidation: when it computes the whole-image metrics and when it repeats them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from rmib.data.pipeline import Example
from rmib.segment import WholeImageValidation


class _Segmenter:
    def __init__(self, prob):
        self.prob = prob

    def predict_prepared(self, image, fov=None):
        return self.prob


class _Model:
    stop_training = False


def _validation(every, epochs=None):
    rng = np.random.default_rng(0)
    mask = (rng.random((8, 8)) < 0.3).astype(np.uint8)
    prob = rng.random((8, 8)).astype(np.float32)
    example = Example("a", np.zeros((8, 8, 3), np.uint8), mask, np.ones((8, 8), np.uint8))
    built = []

    def make(model):
        built.append(model)
        return _Segmenter(prob)

    callback = WholeImageValidation([example], make, every=every, epochs=epochs)
    callback.set_model(_Model())
    return callback, built, average_precision_score(mask.ravel(), prob.ravel())


def test_computes_every_n_epochs_and_at_the_last():
    callback, built, expected = _validation(every=3, epochs=5)
    for epoch in range(5):
        logs = {}
        callback.on_epoch_end(epoch, logs)
        assert logs["val_aupr"] == pytest.approx(expected)
    # Epoch 1 (the first values), 3 (every 3), 5 (the last).
    assert len(built) == 3


def test_an_epoch_a_time_limit_makes_the_last_is_validated():
    callback, built, _ = _validation(every=100)
    callback.on_epoch_end(0, {})
    callback.on_epoch_end(1, {})
    assert len(built) == 1
    callback.model.stop_training = True  # rmib.training's time limit, which runs first
    callback.on_epoch_end(2, {})
    assert len(built) == 2
