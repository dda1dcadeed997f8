import numpy as np
import pytest

import rmib.grading
from rmib.methods.grading.grid import grid_positions
from rmib.methods.grading.lesion_map import (
    apply_lesion_map,
    predict_lesion_map,
    weighted_lesion_map,
)


def test_hand_worked_map_with_overlaps():
    # size 6, patch 4, overlap 2 -> offsets [0, 2]; blocks rows/cols 0-3 and 2-5.
    labels = np.array([[0, 3], [1, 2]])
    probs = np.array([[0.5, 1.0], [0.8, 0.25]])
    # LP = (L + 1) * P = [[0.5, 4.0], [1.6, 0.75]]. Pixels 0-1 lie in block 0 only,
    # 2-3 in both, 4-5 in block 1 only, along each axis.
    expected_blocks = np.array(
        [
            [0.5, (0.5 + 4.0) / 2, 4.0],
            [(0.5 + 1.6) / 2, (0.5 + 4.0 + 1.6 + 0.75) / 4, (4.0 + 0.75) / 2],
            [1.6, (1.6 + 0.75) / 2, 0.75],
        ]
    )
    expected = np.kron(expected_blocks, np.ones((2, 2)))
    weights = weighted_lesion_map(labels, probs, 6, 4, 2)
    assert weights.dtype == np.float32
    assert weights.shape == (6, 6)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights[2, 2] == pytest.approx(1.7125)
    # Flat row-major maps give the same answer.
    np.testing.assert_array_equal(
        weighted_lesion_map(labels.ravel(), probs.ravel(), 6, 4, 2), weights
    )


def test_hand_worked_map_with_uneven_overlap():
    # size 5, patch 4, overlap 2 -> offsets [0, 1]: pixel 0 in block 0 only,
    # 1-3 in both, 4 in block 1 only. Only cell (0, 0) has weight (L + 1) * P = 1.
    labels = np.zeros((2, 2), dtype=int)
    probs = np.array([[1.0, 0.0], [0.0, 0.0]])
    row = [1.0, 0.5, 0.5, 0.5, 0.0]
    inner = [0.5, 0.25, 0.25, 0.25, 0.0]
    expected = np.array([row, inner, inner, inner, [0.0] * 5])
    np.testing.assert_allclose(weighted_lesion_map(labels, probs, 5, 4, 2), expected)


def test_matches_block_averaging_loop_at_default_grid():
    rng = np.random.default_rng(0)
    positions = grid_positions(800, 64, 32)
    n = len(positions)
    labels = rng.integers(0, 4, (n, n))
    probs = rng.uniform(0.25, 1.0, (n, n))
    total = np.zeros((800, 800))
    count = np.zeros((800, 800))
    for i, y in enumerate(positions):
        for j, x in enumerate(positions):
            total[y : y + 64, x : x + 64] += (labels[i, j] + 1) * probs[i, j]
            count[y : y + 64, x : x + 64] += 1
    weights = weighted_lesion_map(labels, probs, 800, 64, 32)
    np.testing.assert_allclose(weights, total / count, rtol=1e-5)
    assert 0.25 <= weights.min() and weights.max() <= 4.0


def test_no_overlap_map_is_piecewise_constant():
    labels = np.array([[3, 0], [0, 1]])
    probs = np.array([[1.0, 0.5], [1.0, 0.5]])
    expected = np.kron(np.array([[4.0, 0.5], [1.0, 1.0]]), np.ones((3, 3)))
    np.testing.assert_allclose(weighted_lesion_map(labels, probs, 6, 3, 0), expected)


@pytest.mark.parametrize(
    "labels,probs,match",
    [
        (np.zeros((3, 3)), np.ones((3, 3)), r"labels must have shape \(2, 2\)"),
        (np.zeros((2, 2)), np.ones(5), r"probs must have shape"),
        (-np.ones((2, 2)), np.ones((2, 2)), "non-negative"),
        (np.full((2, 2), 0.5), np.ones((2, 2)), "integers"),
        (np.zeros((2, 2)), np.full((2, 2), 1.5), r"\[0, 1\]"),
    ],
)
def test_bad_maps_are_refused(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        weighted_lesion_map(labels, probs, 6, 4, 2)


def test_apply_lesion_map_scales_by_a_quarter_and_keeps_range():
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    weights = np.array([[4.0, 2.0], [1.0, 0.0]], dtype=np.float32)
    out = apply_lesion_map(image, weights)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[..., 0], [[200.0, 100.0], [50.0, 0.0]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # A 2-D image and a batch with per-image maps.
    np.testing.assert_allclose(apply_lesion_map(image[..., 0], weights), out[..., 0])
    batch = np.stack([image, image])
    maps = np.stack([weights, 4 - weights])
    out_batch = apply_lesion_map(batch, maps)
    np.testing.assert_allclose(out_batch[1, ..., 1], [[0.0, 100.0], [150.0, 200.0]])


def test_apply_lesion_map_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        apply_lesion_map(np.zeros((4, 4, 3)), np.ones((3, 3)))


def test_predict_lesion_map_runs_the_grid_in_batches():
    # size 6, patch 4, overlap 2: the patch at (y, x) has its class in pixel (y, x).
    image = np.zeros((6, 6, 3), dtype=np.uint8)
    classes = {(0, 0): 0, (0, 2): 3, (2, 0): 1, (2, 2): 2}
    top = {0: 0.5, 3: 1.0, 1: 0.8, 2: 0.4}
    for (y, x), c in classes.items():
        image[y, x, 0] = c
    calls = []

    def predict(batch):
        calls.append(batch.shape)
        assert batch.dtype == np.float32
        out = []
        for patch in batch:
            c = int(patch[0, 0, 0])
            p = np.full(4, (1 - top[c]) / 3)
            p[c] = top[c]
            out.append(p)
        return np.array(out)

    found = predict_lesion_map(predict, image, 4, 2, batch_size=3)
    weights, labels, probs = found.weights, found.labels, found.probs
    assert calls == [(3, 4, 4, 3), (1, 4, 4, 3)]
    np.testing.assert_array_equal(labels, [[0, 3], [1, 2]])
    np.testing.assert_allclose(probs, [[0.5, 1.0], [0.8, 0.4]], rtol=1e-6)
    # LP = [[0.5, 4.0], [1.6, 1.2]]; centre pixels average all four.
    assert weights[3, 3] == pytest.approx((0.5 + 4.0 + 1.6 + 1.2) / 4)
    assert weights[5, 0] == pytest.approx(1.6)
    np.testing.assert_allclose(found.class_probs.max(axis=1), probs.ravel(), rtol=1e-6)


def test_predict_lesion_map_checks_the_prediction_shape():
    with pytest.raises(ValueError, match="returned shape"):
        predict_lesion_map(lambda b: np.ones(len(b)), np.zeros((6, 6, 3)), 4, 2)
    with pytest.raises(ValueError, match="square"):
        predict_lesion_map(lambda b: b, np.zeros((6, 8, 3)), 4, 2)


def test_public_names_stay_in_rmib_grading():
    # README's public API: rmib.grading.grid_positions and rmib.grading.weighted_lesion_map.
    assert rmib.grading.grid_positions is grid_positions
    assert rmib.grading.weighted_lesion_map is weighted_lesion_map
    assert rmib.grading.grid_positions(100, 64, 32) == [0, 32, 36]
