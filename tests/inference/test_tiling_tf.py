"""`rmib.inference.tiling_tf`: the TensorFlow tiling of exported graphs equals the NumPy one.

`tiled_probability` (what an exported ``segment_image`` runs) against
`rmib.inference.predict_tiled` (what `rmib predict` runs): the same tile grid,
padding, window weights and result.
"""

import numpy as np
import pytest
import tensorflow as tf

from rmib.inference.tiling import predict_tiled, tile_grid
from rmib.inference.tiling_tf import reflect_indices, tile_starts, tiled_probability

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "length, tile, stride", [(10, 4, 3), (11, 4, 3), (4, 4, 1), (100, 30, 30), (97, 16, 5)]
)
def test_tile_starts_equal_tile_grid(length, tile, stride):
    assert tile_starts(length, tile, stride).numpy().tolist() == tile_grid(length, tile, stride)


@pytest.mark.parametrize("length, padded", [(5, 5), (5, 8), (3, 12), (1, 4), (7, 32)])
def test_reflect_indices_equal_numpy_reflect_padding(length, padded):
    expected = np.pad(np.arange(length), (0, padded - length), mode="reflect")
    np.testing.assert_array_equal(reflect_indices(length, padded).numpy(), expected)


@pytest.mark.parametrize(
    "height, width, tile, overlap, batch",
    [(40, 57, 16, 0.25, 3), (9, 5, 16, 0.5, 2), (32, 32, 32, 0.0, 1)],
)
def test_an_identity_like_model_gives_the_image_back(height, width, tile, overlap, batch):
    # A tile larger than the image (9 x 5 in 16-px tiles) is reflect-padded, then cropped.
    image = np.random.default_rng(height).uniform(0, 255, (height, width, 3)).astype(np.float32)
    fov = np.ones((height, width), np.uint8)
    got = tiled_probability(
        lambda tiles: tiles + 1.0, tf.constant(image), tf.constant(fov), tile, overlap, batch, 3
    ).numpy()
    expected = predict_tiled(lambda tiles: tiles + 1.0, image, tile, overlap, batch, mask=fov)
    np.testing.assert_allclose(got, image + 1.0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "height, width, tile, overlap, batch",
    [
        (100, 130, 32, 0.125, 2),
        (20, 50, 32, 0.5, 3),
        (64, 64, 64, 0.25, 1),
        (7, 3, 32, 0.0, 2),
        (97, 61, 32, 0.9, 5),
    ],
)
def test_tiled_probability_equals_predict_tiled(height, width, tile, overlap, batch):
    # The prediction depends on the whole tile (its mean): the blend of neighbouring
    # tiles, so the grid and the window weights, shows in the result.
    def predictor(tiles):
        tiles = tf.convert_to_tensor(tiles, tf.float32)
        local = tf.nn.avg_pool2d(tiles, 3, 1, "SAME")[..., :1] / 50.0
        return tf.sigmoid(local - 2.0 + tf.reduce_mean(tiles, axis=[1, 2, 3], keepdims=True) / 99)

    rng = np.random.default_rng(height)
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    fov = np.zeros((height, width), np.uint8)
    fov[height // 4 : height - height // 4, width // 5 : width - 1] = 1
    for mask in (fov, np.ones_like(fov)):
        expected = predict_tiled(
            lambda t: predictor(t).numpy(), image, tile, overlap, batch, mask=mask
        )
        got = tiled_probability(
            predictor, tf.constant(image), tf.constant(mask), tile, overlap, batch
        ).numpy()
        assert expected.std() > 0.01  # the predictor depends on the tile: seams would show
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_boxes_equal_predict_tiled_boxes():
    # Eager: the while loop runs in Python, so the boxes can be recorded.
    seen = {"numpy": [], "tf": []}

    def recorder(key):
        def predict(tiles, boxes):
            seen[key].append(np.asarray(boxes))
            return tf.zeros(tf.concat([tf.shape(tiles)[:3], [1]], 0))

        return predict

    image = np.zeros((50, 70, 3), np.float32)
    fov = np.ones((50, 70), np.uint8)
    predict_tiled(recorder("numpy"), image, 32, 0.25, 100, with_boxes=True, mask=fov)
    tiled_probability(
        recorder("tf"), tf.constant(image), tf.constant(fov), 32, 0.25, 100, with_boxes=True
    )
    np.testing.assert_array_equal(np.concatenate(seen["tf"]), np.concatenate(seen["numpy"]))
