import itertools

import pytest

from rmib.methods.grading.grid import grid_boxes, grid_positions


def test_defaults_at_800_px_tile_exactly():
    positions = grid_positions(800, 64, 32)
    assert positions == list(range(0, 737, 32))
    assert len(positions) == 24
    assert positions[-1] == 736


def test_last_patch_is_flush_with_the_edge():
    # Regular offsets 0, 32 (64 + 32 = 96 <= 100); 64 would end at 128 > 100; edge at 36.
    assert grid_positions(100, 64, 32) == [0, 32, 36]
    # The paper's s = floor((d - h) / (h - ov)) = floor(36 / 32) = 1 would miss the edge.
    assert grid_positions(10, 4, 0) == [0, 4, 6]
    assert grid_positions(6, 4, 2) == [0, 2]
    assert grid_positions(5, 4, 2) == [0, 1]


def test_patch_equal_to_size_gives_one_patch():
    assert grid_positions(64, 64, 0) == [0]
    assert grid_positions(64, 64, 63) == [0]


def test_overlap_of_patch_minus_one_is_stride_one():
    assert grid_positions(6, 4, 3) == [0, 1, 2]


@pytest.mark.parametrize("size,patch,overlap", [(800, 64, 32), (100, 64, 32), (97, 13, 5)])
def test_every_pixel_is_covered_and_patches_fit(size, patch, overlap):
    positions = grid_positions(size, patch, overlap)
    assert positions == sorted(set(positions))
    assert positions[0] == 0 and positions[-1] == size - patch
    covered = set()
    for p in positions:
        covered.update(range(p, p + patch))
    assert covered == set(range(size))
    # Steps never exceed the stride, so neighbours overlap by at least `overlap`.
    assert all(b - a <= patch - overlap for a, b in itertools.pairwise(positions))


@pytest.mark.parametrize("overlap", [-1, 64, 100])
def test_bad_overlap_names_the_value(overlap):
    with pytest.raises(ValueError, match=f"overlap.*{overlap}"):
        grid_positions(800, 64, overlap)


def test_patch_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="65"):
        grid_positions(64, 65, 0)


@pytest.mark.parametrize("args", [(800, 0, 0), (0, 1, 0), (800.0, 64, 32), (800, 64, 0.5)])
def test_bad_sizes_are_refused(args):
    with pytest.raises(ValueError):
        grid_positions(*args)


def test_grid_boxes_row_major():
    assert grid_boxes(6, 4, 2) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert len(grid_boxes(800, 64, 32)) == 576
    assert grid_boxes(100, 64, 32)[3] == (32, 0)
