import itertools

import numpy as np
import pytest

from rmib.inference.tiling import (
    WINDOW_FLOOR,
    mask_box,
    plan_tiles,
    predict_tiled,
    ramp_profile,
    tile_grid,
    weight_window,
)

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
    for overlap in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="overlap must be in \\[0, 1\\), got"):
            predict_tiled(plus_one, image, 4, overlap, 2)
    for overlap in ("0.5", True, None):
        with pytest.raises(ValueError, match="overlap must be a fraction in \\[0, 1\\) or pixels"):
            predict_tiled(plus_one, image, 4, overlap, 2)
    for overlap in (-1, -7):
        with pytest.raises(ValueError, match=f"overlap of {overlap} pixels must be >= 0"):
            predict_tiled(plus_one, image, 4, overlap, 2)
    with pytest.raises(ValueError, match="window must be one of gaussian, ramp"):
        predict_tiled(plus_one, image, 4, 0.5, 2, window="hann")
    for region in ((0, 0, 11, 10), (5, 5, 5, 8), (0, 0, 4), "all"):
        with pytest.raises(ValueError, match="region"):
            predict_tiled(plus_one, image, 4, 0.5, 2, region=region)
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


# ------------------------------------------------------------- large tiles: plan, ramp, region


def test_ramp_profile_by_hand():
    # pixel d from the nearer end weighs (1 - cos(pi (d + 0.5) / ramp)) / 2 below the ramp
    s1, s3 = np.sin(np.pi / 8) ** 2, np.sin(3 * np.pi / 8) ** 2  # 0.1464, 0.8536
    np.testing.assert_allclose(ramp_profile(6, 2, floor=0.0), [s1, s3, 1, 1, s3, s1])
    np.testing.assert_allclose(ramp_profile(5, 0), np.ones(5))
    floor = 0.01
    np.testing.assert_allclose(
        ramp_profile(4, 2, floor), floor + (1 - floor) * np.array([s1, s3, s3, s1])
    )
    # two tiles overlapping by the ramp: the weights of every shared pixel sum to 1 + floor
    profile = ramp_profile(16, 8)
    np.testing.assert_allclose(profile[8:] + profile[:8], 1 + WINDOW_FLOOR)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="ramp must be a non-negative integer"):
            ramp_profile(8, bad)


def test_ramp_blend_moves_from_one_tile_to_the_next():
    # Two 16-px tiles overlapping by 8 on a 24-px row: the first predicts 0, the second 1.
    image = np.zeros((1, 24, 1), np.float32)
    counter = iter(range(10))

    def constant_per_tile(tiles):
        return np.stack([np.full(t.shape, next(counter), np.float32) for t in tiles])

    output = predict_tiled(constant_per_tile, image, (1, 16), 8, 1, window="ramp")[0, :, 0]
    np.testing.assert_array_equal(output[:8], 0)
    np.testing.assert_array_equal(output[16:], 1)
    d = np.arange(8)  # distance of x = 8 + d from the second tile's left end
    rising = WINDOW_FLOOR + (1 - WINDOW_FLOOR) * (1 - np.cos(np.pi * (d + 0.5) / 8)) / 2
    falling = rising[::-1]
    np.testing.assert_allclose(output[8:16], rising / (rising + falling), rtol=1e-6)
    assert np.all(np.diff(output) >= 0)


@pytest.mark.parametrize("height,width", [(1, 1), (37, 53), (64, 64), (100, 33)])
@pytest.mark.parametrize("tile,overlap", [(16, 0), (16, 5), ((24, 40), 12), (128, 3)])
def test_pixel_overlap_and_ramp_identity_plus_one(height, width, tile, overlap):
    image = np.random.default_rng(height * width).random((height, width, 2)).astype(np.float32)
    output = predict_tiled(plus_one, image, tile, overlap, 3, window="ramp")
    np.testing.assert_allclose(output, image + 1, rtol=1e-6)


def test_pixel_overlap_sets_the_stride():
    image = np.zeros((50, 70, 1), np.float32)
    seen = []

    def fn(tiles, boxes):
        seen.extend(map(tuple, boxes))
        return tiles

    predict_tiled(fn, image, (20, 30), 6, 4, with_boxes=True)
    ys = sorted({round(b[0] * 50) for b in seen})
    xs = sorted({round(b[1] * 70) for b in seen})
    assert ys == tile_grid(50, 20, 14) == [0, 14, 28, 30]
    assert xs == tile_grid(70, 30, 24) == [0, 24, 40]


def test_region_tiles_only_the_box_and_zeroes_the_rest():
    rng = np.random.default_rng(5)
    image = rng.random((60, 80, 3)).astype(np.float32)
    box = (7, 11, 50, 69)
    boxes = []

    def fn(tiles, tile_boxes):
        boxes.extend(tile_boxes.tolist())
        return tiles + 1.0

    output = predict_tiled(fn, image, 16, 4, 5, with_boxes=True, region=box, window="ramp")
    y0, x0, y1, x1 = box
    np.testing.assert_allclose(output[y0:y1, x0:x1], image[y0:y1, x0:x1] + 1, rtol=1e-6)
    outside = np.ones((60, 80), bool)
    outside[y0:y1, x0:x1] = False
    assert np.all(output[outside] == 0)
    # boxes are relative to the whole image and every tile lies inside the region
    corners = np.array(boxes) * [60, 80, 60, 80]
    assert corners[:, 0].min() == pytest.approx(y0) and corners[:, 2].max() == pytest.approx(y1)
    assert corners[:, 1].min() == pytest.approx(x0) and corners[:, 3].max() == pytest.approx(x1)
    # a region smaller than the tile is padded, still zero outside
    small = predict_tiled(plus_one, image, 32, 0.25, 2, region=(3, 4, 13, 24))
    np.testing.assert_allclose(small[3:13, 4:24], image[3:13, 4:24] + 1, rtol=1e-6)
    assert small[:3].max() == 0 and small[13:].max() == 0 and small[:, 24:].max() == 0


def test_region_with_mask_equals_whole_image_inside_the_view():
    rng = np.random.default_rng(6)
    image = rng.random((64, 64, 1)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    fov = ((yy - 30) ** 2 + (xx - 34) ** 2 < 20**2).astype(np.uint8)
    box = mask_box(fov)
    assert box == (11, 15, 50, 54)  # centre (30, 34), radius 20: rows 11..49, cols 15..53
    output = predict_tiled(plus_one, image, 16, 4, 4, mask=fov, region=box, window="ramp")
    np.testing.assert_allclose(output[..., 0], np.where(fov > 0, image[..., 0] + 1, 0), rtol=1e-6)


def test_mask_box():
    mask = np.zeros((5, 6), np.uint8)
    assert mask_box(mask) is None
    mask[1:3, 2:5] = 1
    mask[4, 0] = 7
    assert mask_box(mask) == (1, 0, 5, 5)
    assert mask_box(mask[..., None]) == (1, 0, 5, 5)
    with pytest.raises(ValueError, match="mask must be"):
        mask_box(np.zeros(4))


def _tile_count(length, tile, overlap):
    return len(tile_grid(length, tile, tile - overlap)) if tile < length else 1


@pytest.mark.parametrize(
    "height,width,max_pixels,overlap,multiple",
    [
        (2848, 3500, 1024 * 1024, 128, 32),
        (2848, 4288, 1024 * 1024, 128, 32),
        (4000, 6000, 768 * 768, 96, 32),
        (500, 700, 256 * 256, 40, 16),
        (97, 130, 4096, 10, 8),
        (64, 64, 1024 * 1024, 128, 32),
    ],
)
def test_plan_tiles_matches_brute_force(height, width, max_pixels, overlap, multiple):
    th, tw = plan_tiles(height, width, max_pixels, overlap, multiple)
    assert th % multiple == 0 and tw % multiple == 0 and th * tw <= max_pixels
    planned = _tile_count(height, th, overlap) * _tile_count(width, tw, overlap) * th * tw
    # every tile shape of the multiple within the area, counted by tile_grid
    best = min(
        _tile_count(height, a, overlap) * _tile_count(width, b, overlap) * a * b
        for a in range(multiple, -(-height // multiple) * multiple + 1, multiple)
        for b in range(multiple, -(-width // multiple) * multiple + 1, multiple)
        if a * b <= max_pixels and (a > overlap or a >= height) and (b > overlap or b >= width)
    )
    assert planned == best


def test_plan_tiles_by_hand():
    # 2848 rows in 3 tiles of >= (2848 + 2 * 128) / 3 = 1034.7 -> 1056; then at most
    # 1024^2 / 1056 -> 992 columns: 3500 in 4 tiles of (3500 + 3 * 128) / 4 = 971 -> 992.
    assert plan_tiles(2848, 3500, 1024 * 1024, 128, 32) == (1056, 992)
    assert plan_tiles(64, 90, 1024 * 1024, 128, 32) == (64, 96)  # one tile, rounded up
    with pytest.raises(ValueError, match="max_pixels 1000 is too small"):
        plan_tiles(100, 100, 1000, 64, 32)
    with pytest.raises(ValueError, match="overlap must be a non-negative integer"):
        plan_tiles(100, 100, 4096, -1)
