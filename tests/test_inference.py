import itertools

import numpy as np
import pytest

from rmib.inference import predict_tiled, tile_grid, weight_window

pytestmark = pytest.mark.timeout(120)


def plus_one(tiles):
    return tiles + 1.0


def test_tile_grid():
    assert tile_grid(10, 4, 3) == [0, 3, 6]  # 6 + 4 = 10: already flush
    assert tile_grid(11, 4, 3) == [0, 3, 6, 7]  # last one flush with the edge
    assert tile_grid(4, 4, 1) == [0]
    assert tile_grid(3, 8, 2) == [0]  # tile longer than the axis: padded by the caller
    assert tile_grid(7, 1, 1) == list(range(7))
    assert tile_grid(100, 30, 30) == [0, 30, 60, 70]
    for length, tile, stride in [(0, 4, 2), (10, 0, 2), (10, 4, 0), (10.0, 4, 2)]:
        with pytest.raises(ValueError, match="must be a positive integer"):
            tile_grid(length, tile, stride)


@pytest.mark.parametrize("length,tile,stride", [(97, 16, 5), (64, 64, 8), (33, 7, 7), (2, 1, 3)])
def test_tile_grid_covers_every_pixel_in_order(length, tile, stride):
    starts = tile_grid(length, tile, stride)
    assert starts[0] == 0 and starts[-1] == max(0, length - tile)
    assert starts == sorted(set(starts))
    assert all(b - a <= stride for a, b in itertools.pairwise(starts))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_weight_window_has_no_zeros_and_peaks_in_the_centre():
    window = weight_window(16)
    assert window.shape == (16, 16) and window.dtype == np.float32
    assert window.min() > 0 and window.min() == pytest.approx(1e-4)  # floor 1e-2 per axis
    assert window.max() == pytest.approx(1.0, abs=0.05)
    assert window[7, 7] > window[2, 7] > window[2, 2] > 0
    # separable: every row is a multiple of every other
    np.testing.assert_allclose(
        window * window[7, 7], np.outer(window[:, 7], window[7, :]), rtol=1e-5
    )
    # sigma = 16 / 8 = 2, centre at 7.5: rows 4 and 7 lie 3.5 and 0.5 px from it, so
    # their ratio is exp(-(3.5^2 - 0.5^2) / (2 * 2^2)) = exp(-1.5)
    assert window[4, 7] / window[7, 7] == pytest.approx(np.exp(-1.5), rel=1e-5)
    np.testing.assert_allclose(window, window[::-1, ::-1])  # symmetric
    rectangular = weight_window((5, 9))
    assert rectangular.shape == (5, 9) and rectangular.min() > 0
    assert weight_window(1).tolist() == [[1.0]]


@pytest.mark.parametrize("height,width", [(37, 53), (64, 64), (1, 20), (20, 1), (1, 1), (5, 70)])
@pytest.mark.parametrize("tile", [8, 16, (12, 20), 100])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_identity_plus_one_everywhere(height, width, tile, overlap):
    rng = np.random.default_rng(height * 1000 + width)
    image = rng.random((height, width, 3)).astype(np.float32)
    output = predict_tiled(plus_one, image, tile, overlap, batch_size=4)
    assert output.shape == (height, width, 3) and output.dtype == np.float32
    np.testing.assert_allclose(output, image + 1, atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_tile_larger_than_image_uint8_input(pad_mode):
    image = np.arange(5 * 7 * 2, dtype=np.uint8).reshape(5, 7, 2)
    seen = []

    def fn(tiles):
        seen.append(tiles.copy())
        return tiles * 2

    output = predict_tiled(fn, image, 16, 0.5, 2, pad_mode=pad_mode)
    np.testing.assert_allclose(output, image.astype(np.float32) * 2, atol=1e-4)
    assert len(seen) == 1 and seen[0].shape == (1, 16, 16, 2) and seen[0].dtype == np.float32
    if pad_mode == "constant":
        assert np.all(seen[0][0, 5:] == 0) and np.all(seen[0][0, :, 7:] == 0)
    else:
        np.testing.assert_array_equal(seen[0][0, 5, :7], image[3])  # row 5 mirrors row 3


def test_outputs_with_a_different_channel_count():
    image = np.random.default_rng(0).random((30, 41, 3)).astype(np.float32)

    def two_maps(tiles):
        return np.stack([tiles.sum(-1), tiles[..., 0] - tiles[..., 2]], axis=-1)

    output = predict_tiled(two_maps, image, 16, 0.5, 3)
    assert output.shape == (30, 41, 2)
    np.testing.assert_allclose(output[..., 0], image.sum(-1), atol=1e-5)
    np.testing.assert_allclose(output[..., 1], image[..., 0] - image[..., 2], atol=1e-5)


def test_blending_averages_inconsistent_tiles_smoothly():
    # Each tile predicts a constant: its own call index. The result must stay within the
    # range of the tiles covering a pixel, with no jump larger than one index.
    image = np.zeros((40, 40, 1), np.float32)
    counter = iter(range(1000))

    def constant_per_tile(tiles):
        return np.stack([np.full(tiles.shape, next(counter), np.float32) for _ in tiles])[:, 0]

    output = predict_tiled(constant_per_tile, image, 16, 0.5, 1)[..., 0]
    assert output.min() >= 0 and output.max() <= 15 + 1e-4  # 4 x 4 tiles
    # a separable window blends neighbouring columns by a logistic of slope
    # stride / sigma^2 = 8 / 4 per pixel: the steepest step is 2 * sigmoid(1) - 1 = 0.46
    assert np.abs(np.diff(output, axis=1)).max() == pytest.approx(0.462, abs=0.01)
    assert np.abs(np.diff(output, axis=0)).max() == pytest.approx(4 * 0.462, abs=0.04)


def test_batches_never_exceed_batch_size():
    image = np.zeros((70, 90, 1), np.float32)
    sizes = []

    def fn(tiles):
        sizes.append(len(tiles))
        return tiles

    predict_tiled(fn, image, 16, 0.5, batch_size=5)
    rows, cols = len(tile_grid(70, 16, 8)), len(tile_grid(90, 16, 8))
    assert sum(sizes) == rows * cols
    assert max(sizes) == 5 and all(size <= 5 for size in sizes)


def coordinate_image(height, width):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols], axis=-1).astype(np.float32)


@pytest.mark.parametrize("height,width,tile", [(50, 70, 16), (33, 20, (8, 12)), (10, 6, 16)])
def test_boxes_match_tile_positions(height, width, tile):
    image = coordinate_image(height, width)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    seen_boxes = []

    def from_box(tiles, boxes):
        assert boxes.dtype == np.float32 and boxes.shape == (len(tiles), 4)
        seen_boxes.append(boxes)
        out = np.empty_like(tiles)
        for i, (y0, x0, y1, x1) in enumerate(boxes):
            assert (y1 - y0) * height == pytest.approx(th, abs=1e-3)
            assert (x1 - x0) * width == pytest.approx(tw, abs=1e-3)
            rows = y0 * height + np.arange(th)
            cols = x0 * width + np.arange(tw)
            out[i, ..., 0], out[i, ..., 1] = np.meshgrid(rows, cols, indexing="ij")
        return out

    output = predict_tiled(from_box, image, tile, 0.5, 4, with_boxes=True)
    # the coordinates rebuilt from each box agree with the pixels the tile holds
    np.testing.assert_allclose(output, image, atol=1e-3)
    boxes = np.concatenate(seen_boxes)
    assert boxes[:, :2].min() == 0
    assert boxes[:, 2].max() == pytest.approx(max(height, th) / height)
    assert boxes[:, 3].max() == pytest.approx(max(width, tw) / width)


def test_mask_zeroes_outside_and_skips_empty_tiles():
    height, width = 64, 64
    rows, cols = np.ogrid[:height, :width]
    mask = ((rows - 32) ** 2 + (cols - 32) ** 2 < 20**2).astype(np.uint8)
    image = np.random.default_rng(1).random((height, width, 2)).astype(np.float32)
    calls = []

    def fn(tiles):
        calls.append(len(tiles))
        return tiles + 1

    output = predict_tiled(fn, image, 16, 0.0, 4, mask=mask)
    inside = mask.astype(bool)
    np.testing.assert_allclose(output[inside], image[inside] + 1, atol=1e-5)
    assert np.all(output[~inside] == 0)
    assert sum(calls) < 16  # the four corner tiles hold no field-of-view pixel
    # a mask with a trailing channel axis, and one with no field of view at all
    np.testing.assert_array_equal(
        predict_tiled(plus_one, image, 16, 0.0, 4, mask=mask[..., None]), output
    )
    blank = predict_tiled(plus_one, image, 16, 0.5, 4, mask=np.zeros((height, width)))
    assert blank.shape == (height, width, 2) and np.all(blank == 0)


def test_accepts_tensor_outputs():
    import tensorflow as tf

    image = np.random.default_rng(2).random((20, 25, 3)).astype(np.float32)
    output = predict_tiled(lambda t: tf.convert_to_tensor(t) * 3.0, image, 8, 0.5, 8)
    np.testing.assert_allclose(output, image * 3, atol=1e-5)


def test_argument_validation():
    image = np.zeros((10, 10, 1), np.float32)
    for overlap in (1.0, -0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="overlap must be in \\[0, 1\\), got"):
            predict_tiled(plus_one, image, 4, overlap, 2)
    with pytest.raises(ValueError, match="overlap must be in \\[0, 1\\), got 1.0"):
        predict_tiled(plus_one, image, 4, 1.0, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        predict_tiled(plus_one, image, 4, 0.5, 0)
    with pytest.raises(ValueError, match="tile"):
        predict_tiled(plus_one, image, (4, 4, 4), 0.5, 2)
    with pytest.raises(ValueError, match="tile height must be a positive integer"):
        predict_tiled(plus_one, image, 0, 0.5, 2)
    with pytest.raises(ValueError, match="image must be \\(H, W, C\\)"):
        predict_tiled(plus_one, np.zeros((10, 10)), 4, 0.5, 2)
    with pytest.raises(ValueError, match="mask is"):
        predict_tiled(plus_one, image, 4, 0.5, 2, mask=np.ones((9, 10)))
    with pytest.raises(ValueError, match="pad_mode"):
        predict_tiled(plus_one, image, 16, 0.5, 2, pad_mode="wrap")
    with pytest.raises(ValueError, match="predict_fn returned shape \\(1, 4, 4\\)"):
        predict_tiled(lambda t: t[:1, ..., 0], image, 4, 0.5, 2)
