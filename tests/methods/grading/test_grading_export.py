"""The grader's lesion map in TensorFlow ops (`rmib.methods.grading.export`) equals the NumPy one.

An exported ``grade_image`` computes M and I* inside the graph; they must be
what `rmib.grading.weighted_lesion_map` and `rmib.methods.grading.lesion_map.global_input` give
(`rmib grade predict`), else the global net would see another image.
"""

import numpy as np
import pytest
import tensorflow as tf

from rmib.grading import grid_positions, weighted_lesion_map
from rmib.methods.grading.export import global_input_graph, lesion_map_graph
from rmib.methods.grading.lesion_map import global_input, predict_lesion_map

pytestmark = pytest.mark.timeout(300)


def local_net(patches):
    """A stand-in local net: 4-class softmax of each patch's channel means (any batch size)."""
    patches = tf.convert_to_tensor(patches, tf.float32)
    means = (tf.reduce_mean(patches, axis=[1, 2]) - 127.5) / 4.0  # (B, 3), about 0 +- 1
    logits = tf.concat([means, tf.zeros_like(means[:, :1])], axis=1)
    return tf.nn.softmax(logits)


@pytest.mark.parametrize(
    "size, patch, overlap, batch", [(64, 16, 8, 5), (48, 16, 0, 64), (50, 12, 4, 7)]
)
def test_lesion_map_graph_equals_weighted_lesion_map(size, patch, overlap, batch):
    rng = np.random.default_rng(size + patch)
    image = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    weights, labels, probs = (
        t.numpy() for t in lesion_map_graph(local_net, tf.constant(image), patch, overlap, batch)
    )
    n = len(grid_positions(size, patch, overlap))
    assert labels.shape == probs.shape == (n, n) and weights.shape == (size, size)
    assert len(np.unique(labels)) > 1  # several labels: the (L + 1) weighting shows

    expected = predict_lesion_map(lambda x: local_net(x).numpy(), image, patch, overlap, batch)
    np.testing.assert_array_equal(labels, expected.labels)
    np.testing.assert_allclose(probs, expected.probs, rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        weights, weighted_lesion_map(labels, probs, size, patch, overlap), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(weights, expected.weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, side", [(64, 32), (80, 24), (50, 50)])
def test_global_input_graph_equals_global_input(size, side):
    rng = np.random.default_rng(size)
    image = rng.uniform(0, 255, (size, size, 3)).astype(np.uint8)
    weights = rng.uniform(0, 4, (size, size)).astype(np.float32)
    got = global_input_graph(tf.constant(image), side, tf.constant(weights)).numpy()
    np.testing.assert_array_equal(got, global_input(image, side, weights).astype(np.float32))
    plain = global_input_graph(tf.constant(image), side).numpy()
    np.testing.assert_array_equal(plain, global_input(image, side).astype(np.float32))
