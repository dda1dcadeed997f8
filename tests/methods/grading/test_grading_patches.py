import numpy as np
import pytest

from rmib.methods.grading.grid import grid_boxes
from rmib.methods.grading.patches import (
    DEFAULT_MIN_PIXELS,
    EXCLUDED,
    extract_patches,
    iter_patch_batches,
    patch_labels_from_masks,
)


def _put(mask, cell, count, patch=4):
    """Set `count` pixels of grid cell (i, j) (no-overlap grid), row by row."""
    i, j = cell
    block = mask[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
    block.flat[:count] = 1


def _rule_masks():
    # 12 px image, 4 px patches, no overlap -> 3 x 3 grid, one rule case per cell.
    masks = {code: np.zeros((12, 12), dtype=np.uint8) for code in ("MA", "HE", "EX", "SE")}
    _put(masks["MA"], (0, 1), 3)  # MA at the threshold -> 1
    _put(masks["MA"], (0, 2), 2)  # MA below it -> normal
    _put(masks["MA"], (1, 0), 2)  # HE 5 beats MA 2 -> 2
    _put(masks["HE"], (1, 0), 5)
    _put(masks["SE"], (1, 1), 6)  # only SE counts (EX 2 < 3) -> excluded
    _put(masks["EX"], (1, 1), 2)
    _put(masks["EX"], (1, 2), 4)  # tie EX 4 = HE 4 -> lower class, 2
    _put(masks["HE"], (1, 2), 4)
    _put(masks["EX"], (2, 0), 10)  # EX 10 beats MA 3 -> 3
    _put(masks["MA"], (2, 0), 3)
    _put(masks["SE"], (2, 1), 2)  # SE below the threshold -> normal
    _put(masks["SE"], (2, 2), 5)  # SE with a counted MA -> 1
    _put(masks["MA"], (2, 2), 3)
    return masks


def test_label_rule_cell_by_cell():
    labels = patch_labels_from_masks(_rule_masks(), 12, 4, 0, min_pixels=3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [[0, 1, 0], [2, EXCLUDED, 2], [3, 0, 1]])


def test_min_pixels_one_counts_every_lesion_pixel():
    labels = patch_labels_from_masks(_rule_masks(), 12, 4, 0, min_pixels=1)
    np.testing.assert_array_equal(labels, [[0, 1, 1], [2, 3, 2], [3, EXCLUDED, 1]])


def test_default_min_pixels():
    assert DEFAULT_MIN_PIXELS == 3
    masks = _rule_masks()
    np.testing.assert_array_equal(
        patch_labels_from_masks(masks, 12, 4, 0),
        patch_labels_from_masks(masks, 12, 4, 0, min_pixels=3),
    )


def test_overlapping_patches_share_a_lesion():
    # size 6, patch 4, overlap 2 -> offsets [0, 2]; pixels 2-3 lie in all four patches.
    ma = np.zeros((6, 6), dtype=np.uint8)
    ma[2, 2] = ma[2, 3] = ma[3, 2] = 1
    he = np.zeros((6, 6), dtype=np.uint8)
    he[4:6, 0:2] = 1  # 4 px, only in the patch at (2, 0)
    labels = patch_labels_from_masks({"MA": ma, "HE": he}, 6, 4, 2)
    np.testing.assert_array_equal(labels, [[1, 1], [2, 1]])


def test_none_and_missing_masks_are_absent_and_od_is_ignored():
    ex = np.zeros((8, 8), dtype=bool)
    ex[5:8, 5:8] = True
    masks = {"EX": ex, "MA": None, "OD": np.ones((8, 8), dtype=np.uint8)}
    np.testing.assert_array_equal(patch_labels_from_masks(masks, 8, 4, 0), [[0, 0], [0, 3]])


def test_matches_a_brute_force_count_on_random_masks():
    rng = np.random.default_rng(1)
    size, patch, overlap = 40, 8, 3
    masks = {code: (rng.random((size, size)) < 0.04).astype(np.uint8) for code in ("MA", "HE")}
    masks["EX"] = (rng.random((size, size)) < 0.02) * 255
    masks["SE"] = (rng.random((size, size)) < 0.08).astype(np.uint8)
    labels = patch_labels_from_masks(masks, size, patch, overlap, min_pixels=3).ravel()
    for k, (y, x) in enumerate(grid_boxes(size, patch, overlap)):
        count = {
            c: int(np.count_nonzero(m[y : y + patch, x : x + patch])) for c, m in masks.items()
        }
        best = max(("MA", "HE", "EX"), key=lambda c: count[c])  # first maximum
        if count[best] >= 3:
            expected = {"MA": 1, "HE": 2, "EX": 3}[best]
        elif count["SE"] >= 3:
            expected = EXCLUDED
        else:
            expected = 0
        assert labels[k] == expected, (y, x, count)
    assert {0, 1, 2, 3, EXCLUDED} >= set(labels.tolist())
    assert len(set(labels.tolist())) >= 3


@pytest.mark.parametrize(
    "masks,kwargs,match",
    [
        ({"MA": np.zeros((8, 7))}, {}, "MA mask must be 8x8"),
        ({"XX": np.zeros((8, 8))}, {}, "unknown lesion code 'XX'"),
        ({"MA": np.zeros((8, 8, 3))}, {}, "2-D"),
        ({}, {"min_pixels": 0}, "min_pixels must be at least 1, got 0"),
    ],
)
def test_bad_masks_are_refused(masks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        patch_labels_from_masks(masks, 8, 4, 0, **kwargs)


def test_extract_patches_in_grid_order():
    image = np.arange(6 * 6 * 2, dtype=np.uint16).reshape(6, 6, 2)
    patches = extract_patches(image, 6, 4, 2)
    assert patches.shape == (4, 4, 4, 2) and patches.dtype == np.uint16
    np.testing.assert_array_equal(patches[1], image[0:4, 2:6])
    np.testing.assert_array_equal(patches[2], image[2:6, 0:4])
    assert patches[3, 0, 0, 1] == image[2, 2, 1] == 2 * (2 * 6 + 2) + 1


def test_extract_patches_of_a_gray_image_keep_a_channel_axis():
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    patches = extract_patches(image, 5, 4, 2)
    assert patches.shape == (4, 4, 4, 1)
    assert patches[3, 0, 0, 0] == image[1, 1] == 6


def test_iter_patch_batches_streams_the_same_patches():
    image = np.random.default_rng(2).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    batches = list(iter_patch_batches(image, 100, 64, 32, batch_size=4))
    assert [len(boxes) for boxes, _ in batches] == [4, 4, 1]
    assert [box for boxes, _ in batches for box in boxes] == grid_boxes(100, 64, 32)
    np.testing.assert_array_equal(
        np.concatenate([b for _, b in batches]), extract_patches(image, 100, 64, 32)
    )
    # The last batch holds the bottom-right patch, flush with both edges.
    np.testing.assert_array_equal(batches[-1][1][0], image[36:100, 36:100])


def test_extract_patches_refuses_an_image_of_the_wrong_size():
    with pytest.raises(ValueError, match="image must be 8x8"):
        extract_patches(np.zeros((8, 9, 3)), 8, 4, 0)
