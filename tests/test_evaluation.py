"""WholeImageValidation: when it computes the whole-image metrics and when it repeats them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from rmib.data.pipeline import Example
from rmib.evaluation import (
    WholeImageScores,
    WholeImageValidation,
    evaluate_examples,
    final_validation,
    score_examples,
)


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
    logged = []
    for epoch in range(5):
        logs = {}
        callback.on_epoch_end(epoch, logs)
        logged.append(logs["val_aupr"])
    # Epochs 3 (every 3) and 5 (the last); the others are not computed (NaN).
    assert len(built) == 2 and sorted(callback.results) == [3, 5]
    assert [math.isnan(v) for v in logged] == [True, True, False, True, False]
    assert logged[2] == pytest.approx(expected) and logged[4] == pytest.approx(expected)
    assert callback.results[5]["aupr"] == pytest.approx(expected)


def test_an_epoch_a_time_limit_makes_the_last_is_validated():
    callback, built, _ = _validation(every=100)
    callback.on_epoch_end(0, {})
    callback.on_epoch_end(1, {})
    assert built == []
    callback.model.stop_training = True  # rmib.training's time limit, which runs first
    callback.on_epoch_end(2, {})
    assert len(built) == 1 and list(callback.results) == [3]


class _Run:
    def __init__(self, metrics):
        self.metrics = metrics

    def read_metrics(self):
        return self.metrics


@pytest.mark.parametrize(
    ("training", "phase", "reused"),
    [
        ({"training": {"weights": "best", "best_epoch": 3, "epochs_trained": 5}}, None, 3),
        ({"training": {"weights": "last", "best_epoch": 3, "epochs_trained": 5}}, None, 5),
        ({"training_fine-tune": {"weights": "best", "best_epoch": 5}}, "fine-tune", 5),
        ({"training": {"weights": "best", "best_epoch": 4}}, None, None),  # not validated
        ({}, None, None),  # a worker's copy: no metrics
    ],
)
def test_final_validation_reuses_the_epoch_whose_weights_the_run_ended_with(
    training, phase, reused
):
    callback, _, _ = _validation(every=1)
    callback.results = {3: {"aupr": 0.3}, 5: {"aupr": 0.5}}
    result = final_validation(_Run(training), phase, callback, lambda: {"aupr": -1.0})
    assert result["aupr"] == (-1.0 if reused is None else reused / 10)


class _ByName:
    """A segmenter whose probability map depends on the photograph (by its name)."""

    def __init__(self, probs):
        self.probs = probs

    def predict_prepared(self, image, fov=None):
        return self.probs[int(image[0, 0, 0])]


def test_whole_image_scores_pool_every_pixel_of_every_photograph():
    # Two photographs: AUPR over the pooled pixels (scikit-learn), pixel counts summed
    # and worked out by hand from the thresholded maps, the FOV restricting both.
    rng = np.random.default_rng(3)
    masks = [(rng.random((6, 7)) < 0.3).astype(np.uint8) for _ in range(2)]
    probs = [rng.random((6, 7)).astype(np.float32) for _ in range(2)]
    fovs = [np.ones((6, 7), np.uint8), np.pad(np.ones((4, 5), np.uint8), 1)]
    examples = [
        Example(f"p{i}", np.full((6, 7, 3), i, np.uint8), masks[i], fovs[i]) for i in range(2)
    ]
    seen = []
    scores = WholeImageScores(threshold=0.5, fov_only=True, regions=True)
    score_examples(_ByName(probs), examples, scores, each=lambda e, *rest: seen.append(e.name))
    result = scores.result()
    assert seen == ["p0", "p1"]
    inside = [f.astype(bool) for f in fovs]
    truth = np.concatenate([m[f] for m, f in zip(masks, inside, strict=True)])
    prob = np.concatenate([p[f] for p, f in zip(probs, inside, strict=True)])
    assert result["aupr"] == pytest.approx(average_precision_score(truth, prob), abs=1e-4)
    pred = prob >= 0.5
    tp, fp = int((pred & (truth == 1)).sum()), int((pred & (truth == 0)).sum())
    fn = int((~pred & (truth == 1)).sum())
    assert result["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert set(result["region_f_score"]) == {"0.2", "0.35", "0.5", "0.65", "0.8"}
    assert "aupr_11pt_trapezoid" in result
    # Validation's scores: the same numbers without the region scores.
    plain = evaluate_examples(_ByName(probs), examples, fov_only=True)
    assert plain["aupr"] == result["aupr"] and plain["f1"] == result["f1"]
    assert "region_f_score" not in plain and "aupr_11pt_trapezoid" not in plain
