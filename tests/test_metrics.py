import math
import warnings
from collections import deque

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm

from rmib import metrics

pytestmark = pytest.mark.timeout(120)


def sklearn_ap(y_true, y_score):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.average_precision_score(np.ravel(y_true) > 0, np.ravel(y_score))


# --------------------------------------------------------------------------- AUPR


def test_aupr_hand_worked():
    # scores 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-):
    # thresholds 0.9: P 1, R 1/2; 0.8: P 1/2, R 1/2; 0.7: P 2/3, R 1; 0.1: P 1/2, R 1
    # AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3 + 0 = 5/6
    assert metrics.aupr([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    # a tie of a positive and a negative at the top: P 1/2 at R 1/2, then P 2/3 at R 1
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    assert metrics.aupr([1, 0, 1], [0.9, 0.9, 0.5]) == pytest.approx(7 / 12)


@pytest.mark.parametrize("seed", range(5))
def test_aupr_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((3, 20, 30)) < 0.1
    score = np.round(np.clip(rng.random(truth.shape) * 0.6 + truth * 0.3, 0, 1), 2)  # ties
    assert metrics.aupr(truth, score) == pytest.approx(sklearn_ap(truth, score), abs=1e-12)


def test_aupr_edge_cases():
    assert metrics.aupr([0, 0, 0], [0.1, 0.5, 0.9]) == 0.0  # sklearn's value
    assert metrics.aupr([1, 1], [0.2, 0.2]) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.aupr([1, 0], [1.5, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.aupr([1, 0], [np.nan, 0.2])
    with pytest.raises(ValueError, match="3 values but y_score has 2"):
        metrics.aupr([1, 0, 1], [0.5, 0.2])


def quantised(score):
    return np.rint(np.asarray(score, np.float64) * 65535) / 65535


def test_streaming_aupr_pooled_images_equals_sklearn_on_quantised_scores():
    rng = np.random.default_rng(3)
    accumulator = metrics.StreamingAUPR()
    truths, scores = [], []
    for shape in [(40, 50), (33, 17), (64, 64), (5, 7)]:
        truth = rng.random(shape) < 0.05
        # continuous scores: quantising creates ties across images
        score = np.clip(rng.beta(0.5, 3, shape) + 0.4 * truth * rng.random(shape), 0, 1)
        score[:2, :2] = rng.choice([0.0, 1.0, 0.5, 1 / 3], (2, 2))
        accumulator.update(truth, score.astype(np.float32))
        truths.append(truth.ravel())
        scores.append(score.astype(np.float32).ravel())
    truth, score = np.concatenate(truths), np.concatenate(scores)
    expected = sklearn_ap(truth, quantised(score))
    assert accumulator.result() == pytest.approx(expected, abs=1e-9)
    # quantisation barely moves AP on these scores
    assert accumulator.result() == pytest.approx(metrics.aupr(truth, score), abs=1e-3)

    precision, recall, thresholds = accumulator.pr_curve()
    ref_p, ref_r, ref_t = skm.precision_recall_curve(truth, quantised(score))
    np.testing.assert_allclose(precision, ref_p, atol=1e-12)
    np.testing.assert_allclose(recall, ref_r, atol=1e-12)
    np.testing.assert_allclose(thresholds, ref_t, atol=1e-12)


def test_streaming_aupr_mask_integer_maps_and_merge():
    rng = np.random.default_rng(4)
    truth = rng.random((30, 40)) < 0.1
    score = rng.random((30, 40))
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 5:35] = 1
    masked = metrics.StreamingAUPR()
    masked.update(truth, score, mask=mask)
    inside = mask > 0
    assert masked.result() == pytest.approx(
        sklearn_ap(truth[inside], quantised(score[inside])), abs=1e-9
    )

    # a uint16 map is already quantised; a uint8 map v stands for v / 255
    as_uint16 = np.rint(score * 65535).astype(np.uint16)
    from_uint16 = metrics.StreamingAUPR()
    from_uint16.update(truth, as_uint16)
    assert from_uint16.result() == pytest.approx(sklearn_ap(truth, quantised(score)), abs=1e-9)
    as_uint8 = np.rint(score * 255).astype(np.uint8)
    from_uint8 = metrics.StreamingAUPR()
    from_uint8.update(truth, as_uint8)
    assert from_uint8.result() == pytest.approx(sklearn_ap(truth, as_uint8), abs=1e-9)

    left, right = metrics.StreamingAUPR(), metrics.StreamingAUPR()
    left.update(truth[:15], score[:15])
    right.update(truth[15:], score[15:])
    left.merge(right)
    assert left.result() == pytest.approx(sklearn_ap(truth, quantised(score)), abs=1e-9)


def test_streaming_aupr_few_bins_and_empty():
    # 3 bins: scores quantise to 0, 0.5 or 1
    accumulator = metrics.StreamingAUPR(bins=3)
    accumulator.update([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1])  # -> bins 2, 2, 1, 0
    # thresholds 1: P 1/2, R 1/2; 0.5: P 2/3, R 1; 0: P 1/2 -> AP = 1/4 + 1/3 = 7/12
    assert accumulator.result() == pytest.approx(7 / 12)
    assert metrics.StreamingAUPR().result() == 0.0
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        metrics.StreamingAUPR(bins=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.StreamingAUPR().update([1], [-0.1])
    # a blended probability a few ulps above 1 is clipped into the top bin, not refused
    accumulator = metrics.StreamingAUPR(bins=3)
    accumulator.update([1, 0], [np.float32(1.0000001), 0.0])
    assert accumulator.positives.tolist() == [0, 0, 1] and accumulator.result() == 1.0


def test_quantize16():
    prob = np.array([[0.0, 0.5, 1.0], [1 / 65535, 0.9999999, 1.00001]], np.float32)
    stored = metrics.quantize16(prob)
    assert stored.dtype == np.uint16
    assert stored.tolist() == [[0, 32768, 65535], [1, 65535, 65535]]  # rint(32767.5) = 32768


def test_pr_and_roc_plots_written_atomically(tmp_path):
    rng = np.random.default_rng(5)
    truth = rng.random(200) < 0.3
    prob = np.clip(rng.random(200) * 0.7 + truth * 0.3, 0, 1)
    roc = metrics.save_roc_curve(truth, prob, tmp_path / "plots" / "roc.png", title="ROC")
    pr = metrics.save_pr_curve(truth, prob, tmp_path / "plots" / "pr.png")
    accumulator = metrics.StreamingAUPR()
    accumulator.update(truth, prob)
    streamed = metrics.save_pr_curve_from_stream(accumulator, tmp_path / "plots" / "pr_stream.png")
    for path in (roc, pr, streamed):
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 100
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "pr.png",
        "pr_stream.png",
        "roc.png",
    ]


# ------------------------------------------------------------------ pixel metrics


def test_pixel_metrics_hand_made_3x3():
    pred = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    truth = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    counts = metrics.confusion_counts(pred, truth)
    assert counts == (1, 1, 0, 7)  # tp, fp, fn, tn
    result = metrics.pixel_metrics(*counts)
    assert result["iou"] == pytest.approx(0.5)  # 1 / (1 + 1 + 0)
    assert result["f1"] == pytest.approx(2 / 3)  # 2 / (2 + 1 + 0)
    assert result["sensitivity"] == 1.0
    assert result["ppv"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(8 / 9)
    assert result["specificity"] == pytest.approx(7 / 8)


def test_pixel_metrics_zero_division_conventions():
    empty = np.zeros((3, 3))
    lesion = np.eye(3)
    # no lesion, none predicted: everything 1
    assert metrics.pixel_metrics(*metrics.confusion_counts(empty, empty)) == {
        "sensitivity": 1.0, "ppv": 1.0, "f1": 1.0, "iou": 1.0, "accuracy": 1.0, "specificity": 1.0,
    }  # fmt: skip
    # lesion missed entirely: sensitivity 0, PPV 1 (nothing predicted), F1 0
    missed = metrics.pixel_metrics(*metrics.confusion_counts(empty, lesion))
    assert (missed["sensitivity"], missed["ppv"], missed["f1"], missed["iou"]) == (0, 1, 0, 0)
    # false alarm on a healthy image: PPV 0, sensitivity 1, F1 0
    alarm = metrics.pixel_metrics(*metrics.confusion_counts(lesion, empty))
    assert (alarm["sensitivity"], alarm["ppv"], alarm["f1"]) == (1, 0, 0)
    assert alarm["specificity"] == pytest.approx(6 / 9)


def test_confusion_counts_with_mask():
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    truth = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0]])  # bottom row left out
    assert metrics.confusion_counts(pred, truth, mask) == (2, 1, 1, 2)
    assert metrics.confusion_counts(pred, truth) == (2, 2, 1, 4)
    with pytest.raises(ValueError, match="pred is"):
        metrics.confusion_counts(pred, truth[:2])


# ------------------------------------------------------------------ region score


def region_case():
    """Five hand-drawn component pairs on a 12 x 16 image (see the expected counts)."""
    pred = np.zeros((12, 16), np.uint8)
    truth = np.zeros((12, 16), np.uint8)
    # A, overlap above 0.5: G_A rows 1-3 x cols 1-3 (9 px); C_A rows 1-3 x cols 2-4
    #    (9 px); overlap 6 px, so both ratios are 6/9 = 0.667.
    truth[1:4, 1:4] = 1
    pred[1:4, 2:5] = 1
    # B, overlap below 0.5: G_B rows 6-8 x cols 1-3 (9 px); C_B rows 6-8 x cols 3-7
    #    (15 px); overlap col 3 = 3 px: C_B ratio 3/15 = 0.2, G_B ratio 3/9 = 0.333.
    truth[6:9, 1:4] = 1
    pred[6:9, 3:8] = 1
    # C, a missed lesion: G_C rows 1-2 x cols 10-11 (4 px), nothing predicted.
    truth[1:3, 10:12] = 1
    # D, a spurious prediction: C_D row 10 x cols 10-12 (3 px), no lesion.
    pred[10, 10:13] = 1
    # E, 8-connectivity: C_E is a diagonal of 3 px (4,12) (5,13) (6,14), one
    #    component only with 8-neighbours; G_E = (4,12) (5,13). C_E ratio 2/3, G_E 1.
    pred[[4, 5, 6], [12, 13, 14]] = 1
    truth[[4, 5], [12, 13]] = 1
    return pred, truth


# Worked by hand from region_case():
#   sigma 0.5: A: C_A and G_A hit -> TP = C_A u G_A = rows 1-3 x cols 1-4 = 12
#              B: C_B misses -> FP = 15 - 3 = 12; G_B misses -> FN = 9 - 3 = 6; TP = 3
#              C: FN 4.  D: FP 3.  E: C_E hit -> TP 3 (with 4-connectivity (6,14)
#              would be a separate component with ratio 0 and an FP).
#              TP 18, FP 15, FN 10; F = 2*18 / (2*18 + 15 + 10) = 36/61
#   sigma 0.2: B: C_B ratio is exactly 0.2, not > 0.2 -> still FP 12; G_B 0.333
#              hits -> TP 9, FN 0. TP 12+9+3 = 24, FP 15, FN 4; F = 48/67
#   sigma 0.7: A: both miss -> TP 6, FP col 4 = 3, FN col 1 = 3. E: C_E misses ->
#              FP 1 ((6,14)), G_E hits -> TP 2. TP 6+3+2 = 11, FP 3+12+3+1 = 19,
#              FN 3+6+4 = 13; F = 22/54
EXPECTED = {0.5: (18, 15, 10, 36 / 61), 0.2: (24, 15, 4, 48 / 67), 0.7: (11, 19, 13, 22 / 54)}


@pytest.mark.parametrize("sigma", sorted(EXPECTED))
def test_region_counts_hand_drawn(sigma):
    pred, truth = region_case()
    tp, fp, fn, f = EXPECTED[sigma]
    assert metrics.region_counts(pred, truth, sigma) == (tp, fp, fn)
    assert metrics.region_f_score(pred, truth, sigma) == pytest.approx(f)


def test_region_score_sums_counts_over_images():
    pred, truth = region_case()
    score = metrics.RegionScore(sigmas=(0.2, 0.5, 0.7))
    score.update(pred, truth)
    # second image: a 2-pixel lesion missed entirely -> FN 2 at every sigma
    missed = np.zeros((6, 6), bool)
    missed[2, 2:4] = True
    score.update(np.zeros((6, 6)), missed)
    # third image: empty and empty adds nothing
    score.update(np.zeros((4, 4)), np.zeros((4, 4)))
    result = score.result()
    for sigma, (tp, fp, fn, _) in EXPECTED.items():
        entry = result[sigma]
        assert (entry["tp"], entry["fp"], entry["fn"]) == (tp, fp, fn + 2)
        assert entry["f_score"] == pytest.approx(2 * tp / (2 * tp + fp + fn + 2))
        assert entry["sensitivity"] == pytest.approx(tp / (tp + fn + 2))
        assert entry["ppv"] == pytest.approx(tp / (tp + fp))
    assert score.f_score(0.5) == result[0.5]["f_score"]
    with pytest.raises(ValueError, match="sigma 0.35 is not one of"):
        score.f_score(0.35)
    assert metrics.RegionScore().sigmas == (0.2, 0.35, 0.5, 0.65, 0.8)


def test_region_score_mask_and_edge_cases():
    pred, truth = region_case()
    mask = np.ones_like(pred)
    mask[9:, :] = 0  # hides D (row 10)
    score = metrics.RegionScore(sigmas=(0.5,))
    score.update(pred, truth, mask=mask)
    assert score.result()[0.5]["fp"] == 15 - 3
    empty = np.zeros((5, 5))
    assert metrics.region_f_score(empty, empty, 0.5) == 1.0
    assert metrics.region_f_score(empty, np.eye(5), 0.5) == 0.0
    assert metrics.region_f_score(np.eye(5), empty, 0.5) == 0.0
    for sigma in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="sigma must be"):
            metrics.region_counts(empty, empty, sigma)
    with pytest.raises(ValueError, match="one size"):
        metrics.region_counts(empty, np.zeros((4, 5)), 0.5)


def slow_region_counts(pred, truth, sigma):
    """The Zhang et al. pixel classes by flood fill and Python sets (no OpenCV)."""

    def components(mask):
        seen, found = set(), []
        for start in zip(*np.nonzero(mask), strict=True):
            if start in seen:
                continue
            seen.add(start)
            queue, pixels = deque([start]), []
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        n = (y + dy, x + dx)
                        inside = 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1]
                        if inside and mask[n] and n not in seen:
                            seen.add(n)
                            queue.append(n)
            found.append(set(pixels))
        return found

    pred_set = set(zip(*np.nonzero(pred), strict=True))
    truth_set = set(zip(*np.nonzero(truth), strict=True))
    tp, fp, fn = pred_set & truth_set, set(), set()
    for component in components(pred):
        if len(component & truth_set) / len(component) > sigma:
            tp |= component
        else:
            fp |= component - truth_set
    for component in components(truth):
        if len(component & pred_set) / len(component) > sigma:
            tp |= component
        else:
            fn |= component - pred_set
    return len(tp), len(fp), len(fn)


@pytest.mark.parametrize("seed", range(4))
def test_region_counts_match_a_flood_fill_reference(seed):
    rng = np.random.default_rng(seed)
    truth = cv2.dilate((rng.random((24, 24)) < 0.04).astype(np.uint8), np.ones((3, 3)))
    pred = cv2.dilate((rng.random((24, 24)) < 0.04).astype(np.uint8), np.ones((2, 2)))
    pred[truth.astype(bool) & (rng.random((24, 24)) < 0.5)] = 1
    for sigma in (0.0, 0.2, 0.35, 0.5, 0.8):
        assert metrics.region_counts(pred, truth, sigma) == slow_region_counts(pred, truth, sigma)


# ------------------------------------------------------------------------ grading


@pytest.mark.parametrize("seed", range(4))
def test_quadratic_kappa_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 60)
    y_pred = np.clip(y_true + rng.integers(-2, 3, 60), 0, 4)
    expected = skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(5))
    assert metrics.quadratic_kappa(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    assert metrics.quadratic_kappa(y_true, y_pred, num_classes=5) == pytest.approx(expected)


def test_quadratic_kappa_hand_worked_and_edges():
    assert metrics.quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    # y_true [0, 1], y_pred [1, 0], K = 2: O off-diagonal 1 + 1, W off-diagonal 1,
    # E = [[.5, .5], [.5, .5]]: kappa = 1 - 2 / 1 = -1
    assert metrics.quadratic_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)
    # grade 2 never occurs: weights still use the grade values (distance 3 - 1 = 2)
    y_true, y_pred = [0, 1, 3, 3, 0], [1, 1, 3, 1, 0]
    expected = skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(4))
    assert metrics.quadratic_kappa(y_true, y_pred) == pytest.approx(expected)
    assert math.isnan(metrics.quadratic_kappa([2, 2], [2, 2]))
    with pytest.raises(ValueError, match="num_classes=3 but a grade of 4"):
        metrics.quadratic_kappa([0, 4], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="integer grades"):
        metrics.quadratic_kappa([0.5, 1], [0, 1])


def test_binary_classification_report_equals_sklearn():
    rng = np.random.default_rng(6)
    y_true = rng.random(100) < 0.4
    y_prob = np.clip(rng.random(100) * 0.8 + y_true * 0.25, 0, 1)
    report = metrics.binary_classification_report(y_true, y_prob, threshold=0.5)
    y_pred = y_prob >= 0.5
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["recall"] == pytest.approx(skm.recall_score(y_true, y_pred))
    assert report["precision"] == pytest.approx(skm.precision_score(y_true, y_pred))
    assert report["f1"] == pytest.approx(skm.f1_score(y_true, y_pred))
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(y_true, y_prob))
    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert report["n"] == 100
    one_class = metrics.binary_classification_report([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(one_class["roc_auc"])
    assert one_class["recall"] == pytest.approx(2 / 3)


def test_aupr_11pt_trapezoid_hand_worked():
    """The Dual2Net authors' eval_aupr.py, by hand. Pooled pixels of two "images":
    truth [1, 1, 1 | 0, 0, 0], scores [0.95, 0.55, 0.05 | 0.65, 0.25, 0.0], P = 3.
    score > t:  t = 0        -> TP 3, FP 2: (R, P) = (1, 3/5)
                t = 0.1, 0.2 -> TP 2, FP 2: (2/3, 1/2)
                t = 0.3..0.5 -> TP 2, FP 1: (2/3, 2/3)
                t = 0.6      -> TP 1, FP 1: (1/3, 1/2)
                t = 0.7..0.9 -> TP 1, FP 0: (1/3, 1)
                t = 1.0      -> nothing predicted: (0, 1); then the appended (0, 1).
    Trapezoids where recall drops: (1 - 2/3) * (3/5 + 1/2) / 2 = 11/60,
    (2/3 - 1/3) * (2/3 + 1/2) / 2 = 7/36, (1/3 - 0) * (1 + 1) / 2 = 1/3;
    total 11/60 + 7/36 + 1/3 = (33 + 35 + 60) / 180 = 32/45 = 0.7111...
    Average precision of the same pixels is another number: thresholds 0.95 (R 1/3, P 1),
    0.65 (1/3, 1/2), 0.55 (2/3, 2/3), 0.25 (2/3, 1/2), 0.05 (1, 3/5), 0.0 (1, 1/2):
    1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 1/3 + 2/9 + 1/5 = 34/45 = 0.7556.
    """
    truth = np.array([1, 1, 1, 0, 0, 0])
    score = np.array([0.95, 0.55, 0.05, 0.65, 0.25, 0.0])
    assert metrics.aupr_11pt_trapezoid(truth, score) == pytest.approx(32 / 45, abs=1e-12)
    assert metrics.aupr(truth, score) == pytest.approx(34 / 45, abs=1e-12)
    # Streaming, image by image, on 16-bit quantised scores: the same value here.
    stream = metrics.StreamingAUPR()
    stream.update(truth[:3], score[:3])
    stream.update(truth[3:], score[3:])
    assert stream.aupr_11pt_trapezoid() == pytest.approx(32 / 45, abs=1e-12)
    assert stream.result() == pytest.approx(34 / 45, abs=1e-12)


def test_aupr_11pt_trapezoid_edge_cases():
    # A perfect map: every threshold 0 .. 0.9 gives (1, 1), 1.0 gives (0, 1): area 1.
    assert metrics.aupr_11pt_trapezoid([1, 0], [1.0, 0.0]) == pytest.approx(1.0)
    # No lesion pixel: every point is (0, 1), area 0.
    assert metrics.aupr_11pt_trapezoid([0, 0], [0.3, 0.9]) == 0.0
    # Scores never above 0: nothing is predicted at any threshold, area 0.
    assert metrics.aupr_11pt_trapezoid([1, 0], [0.0, 0.0]) == 0.0
    # All scores 0.5, P = 1 of 2: t = 0..0.4 -> (1, 1/2), then (0, 1):
    # (1 - 0) * (1/2 + 1) / 2 = 3/4.
    assert metrics.aupr_11pt_trapezoid([1, 0], [0.5, 0.5]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="y_true has 2 values but y_score has 3"):
        metrics.aupr_11pt_trapezoid([1, 0], [0.1, 0.2, 0.3])
