"""Test-time flips (`rmib.inference.tta`) against independent NumPy references.

The models are tiny Keras models whose output is known: a 3x3 convolution that
reads each pixel's right-hand neighbour (not symmetric: its flip average is worked
by hand), a fixed random 3x3 convolution (compared with `np.flip` / `np.rot90`
of plain predictions, moved back), and symmetric ones (TTA changes nothing).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rmib import choices
from rmib.errors import RmibError
from rmib.inference.tiling import predict_tiled
from rmib.inference.tta import check_tta, predict_with_tta, transforms, turns
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter
from rmib.methods.segment_config import SegmentConfig, tta_metadata


def _conv_model(kernel) -> keras.Model:
    """A 3x3 convolution (zero padding) of the first channel with `kernel`, no bias."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 3, padding="same", use_bias=False)
    outputs = conv(inputs)
    weights = np.zeros((3, 3, 3, 1), np.float32)
    weights[:, :, 0, 0] = kernel
    conv.set_weights([weights])
    return keras.Model(inputs, outputs)


def _right_neighbour_model() -> keras.Model:
    kernel = np.zeros((3, 3), np.float32)
    kernel[1, 2] = 1.0  # Keras convolves as a cross-correlation: out(y, x) = in(y, x + 1)
    return _conv_model(kernel)


def _random_model() -> keras.Model:
    """A fixed random kernel of positive weights summing to 1 (maps of [0, 1] images stay in it)."""
    kernel = np.random.default_rng(7).uniform(0, 1, (3, 3))
    return _conv_model((kernel / kernel.sum()).astype(np.float32))


def _symmetric_model() -> keras.Model:
    return _conv_model(np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16)


def _pointwise_model() -> keras.Model:
    return _conv_model(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32))


def _image(height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (height, width, 3)).astype(np.float32)


def _neighbours(image):
    """Right, left, lower and upper neighbour of every pixel's first channel, 0 beyond."""
    padded = np.pad(image[..., 0].astype(np.float64), 1)
    return padded[1:-1, 2:], padded[1:-1, :-2], padded[2:, 1:-1], padded[:-2, 1:-1]


def _flips_reference(predict, image, fov):
    """Mean of the predictions of the image and its three np.flip's, each flipped back."""
    maps = []
    for axes in ((), (1,), (0,), (0, 1)):
        moved = np.flip(image, axes) if axes else image
        moved_fov = np.flip(fov, axes) if axes else fov
        prob = predict(np.ascontiguousarray(moved), np.ascontiguousarray(moved_fov))
        maps.append(np.flip(prob, axes) if axes else prob)
    return np.mean(maps, axis=0)


def _dihedral_reference(predict, image, fov):
    """Mean over the 8 symmetries of the square: np.rot90 by k of the image and of its
    left-right mirror, each prediction turned back by -k (and mirrored back)."""
    maps = []
    for mirror in (False, True):
        base, base_fov = (np.fliplr(image), np.fliplr(fov)) if mirror else (image, fov)
        for k in range(4):
            moved = np.ascontiguousarray(np.rot90(base, k))
            moved_fov = np.ascontiguousarray(np.rot90(base_fov, k))
            prob = np.rot90(predict(moved, moved_fov), -k)
            maps.append(np.fliplr(prob) if mirror else prob)
    return np.mean(maps, axis=0)


def _tiled(model, tile=32, overlap=0.25, batch_size=3):
    """Plain `predict_tiled` of `model`: (image, fov) -> (H, W)."""

    def predict(image, fov):
        return predict_tiled(
            lambda tiles: model.predict_on_batch(tiles), image, tile, overlap, batch_size, mask=fov
        )[..., 0]

    return predict


def test_choices_and_transform_counts():
    assert choices.TTA == ("none", "flips", "flips-rot90")
    assert [len(transforms(t)) for t in choices.TTA] == [1, 4, 8]
    assert len(set(transforms("flips-rot90"))) == 8
    assert not turns("flips") and turns("flips-rot90")


def test_bad_tta_names_the_value_and_the_choices():
    for bad in ("flip", "rot90", "", None, 4, "FLIPS"):
        with pytest.raises(RmibError) as error:
            check_tta(bad)
        assert repr(bad) in str(error.value)
        assert "none, flips, flips-rot90" in str(error.value)
    with pytest.raises(RmibError, match="none, flips, flips-rot90, got 'mirror'"):
        TiledSegmenter(_pointwise_model(), {}, tile=32, tta="mirror")
    with pytest.raises(RmibError, match="tta must be one of 'none', 'flips', 'flips-rot90'"):
        SegmentConfig(tta="flip")


def test_flips_of_a_right_neighbour_model_average_left_and_right_by_hand():
    # One 64x96 tile ("auto" tiling plans the image itself, turned: 96x64), so the
    # only zero padding is the image's own border: the answer is worked by hand.
    image = _image(64, 96)
    model = _right_neighbour_model()
    right, left, down, up = _neighbours(image)
    expected = {
        "none": right,
        "flips": (right + left) / 2,
        "flips-rot90": (right + left + down + up) / 4,
    }
    for tta, answer in expected.items():
        segmenter = TiledSegmenter(model, {}, tile="auto", tta=tta)
        np.testing.assert_allclose(segmenter.predict_prepared(image), answer, atol=1e-6)
    assert segmenter.last_plan[0] == (96, 64)  # the last view of flips-rot90 was turned


@pytest.mark.parametrize("shape", [(70, 90), (45, 77), (32, 32)])
def test_flips_equal_numpy_flips_of_overlapping_tiles(shape):
    # Tiles of 32 overlapping by 8 px, the last flush with the edge: flipping the
    # image moves the grid on the content, so each view is tiled differently.
    model = _random_model()
    image = _image(*shape, seed=1)
    fov = np.ones(shape, np.uint8)
    fov[: shape[0] // 3, :5] = 0
    plain = _tiled(model)
    reference = _flips_reference(plain, image, fov)
    np.testing.assert_allclose(predict_with_tta(plain, image, fov, "flips"), reference, atol=1e-6)
    segmenter = TiledSegmenter(model, {}, tile=32, overlap=0.25, batch_size=3, tta="flips")
    np.testing.assert_allclose(segmenter.predict_prepared(image, fov), reference, atol=1e-6)
    assert not segmenter.predict_prepared(image, fov)[fov == 0].any()
    # The model is not symmetric: the test would see a missing or wrong flip.
    assert np.abs(reference - plain(image, fov)).max() > 1e-2


def test_flips_rot90_equal_numpy_rot90_of_overlapping_tiles():
    model = _random_model()
    image = _image(45, 77, seed=2)
    fov = np.ones((45, 77), np.uint8)
    fov[-10:, -12:] = 0
    plain = _tiled(model)
    reference = _dihedral_reference(plain, image, fov)
    got = predict_with_tta(plain, image, fov, "flips-rot90")
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert np.abs(got - _flips_reference(plain, image, fov)).max() > 1e-3


def test_symmetric_models_give_the_same_map_with_and_without_tta():
    image = _image(64, 96, seed=3)
    fov = np.ones((64, 96), np.uint8)
    fov[:20, :20] = 0
    # A pointwise model over overlapping tiles, and a symmetric 3x3 kernel over
    # one tile that is the image (zero padding symmetric too).
    for model, tile in ((_pointwise_model(), 32), (_symmetric_model(), "auto")):
        none = TiledSegmenter(model, {}, tile=tile).predict_prepared(image, fov)
        for tta in ("flips", "flips-rot90"):
            got = TiledSegmenter(model, {}, tile=tile, tta=tta).predict_prepared(image, fov)
            np.testing.assert_allclose(got, none, rtol=1e-6, atol=1e-7)


def test_the_runs_choice_is_the_default_and_the_argument_overrides_it():
    model = _pointwise_model()
    assert TiledSegmenter(model, {}, tile=32).tta == "none"
    assert TiledSegmenter(model, {"tta": "flips"}, tile=32).tta == "flips"
    assert TiledSegmenter(model, {"tta": "flips"}, tile=32, tta="none").tta == "none"
    assert tta_metadata(SegmentConfig()) == {}
    assert tta_metadata(SegmentConfig(tta="flips-rot90")) == {"tta": "flips-rot90"}


def test_dual2net_flips_through_its_resize_and_refuses_turns_of_a_non_square_input():
    model = _random_model()
    image = _image(50, 70, seed=4)
    fov = np.ones((50, 70), np.uint8)
    plain = Dual2NetSegmenter(model, {"image_size": [32, 48]})
    reference = _flips_reference(plain.predict_view, image, fov)
    flips = Dual2NetSegmenter(model, {"image_size": [32, 48], "tta": "flips"})
    np.testing.assert_allclose(flips.predict_prepared(image, fov), reference, atol=1e-5)
    with pytest.raises(RmibError, match="flips-rot90.*32x48.*--tta flips"):
        Dual2NetSegmenter(model, {"image_size": [32, 48]}, tta="flips-rot90")
    square = Dual2NetSegmenter(model, {"image_size": [40, 40]}, tta="flips-rot90")
    reference = _dihedral_reference(square.predict_view, image, fov)
    np.testing.assert_allclose(square.predict_prepared(image, fov), reference, atol=1e-5)
    with pytest.raises(RmibError, match="960x1440.*square --image-size"):
        SegmentConfig(model="dual2net", tta="flips-rot90")
    SegmentConfig(model="dual2net", tta="flips")


def test_local_net_tiles_each_flipped_view():
    model = _random_model()
    image = _image(45, 77, seed=5)
    fov = np.ones((45, 77), np.uint8)
    metadata = {"network": "local", "patch_size": 32}
    segmenter = LocalGlobalSegmenter(model, metadata, overlap=0.25, batch_size=3, tta="flips")
    plain = LocalGlobalSegmenter(model, metadata, overlap=0.25, batch_size=3).predict_view
    reference = _flips_reference(plain, image, fov)
    np.testing.assert_allclose(segmenter.predict_prepared(image, fov), reference, rtol=1e-5)


def test_fused_local_global_runs_globalnet_on_each_flipped_photograph():
    from rmib.methods.local_global.model import build_local_global

    model = build_local_global(2, 2, base_filters=2, max_filters=4, global_size=16, l2=0.0)
    metadata = {
        "network": "fused",
        "global_size": 16,
        "patch_size": 8,
        "depths": {"global": 2, "local": 2},
    }
    image = _image(16, 24, seed=6) * 255
    fov = np.ones((16, 24), np.uint8)
    plain = LocalGlobalSegmenter(model, metadata, overlap=0.25, batch_size=5)
    segmenter = LocalGlobalSegmenter(model, metadata, overlap=0.25, batch_size=5, tta="flips")
    calls = []
    global_features = segmenter._global_features
    segmenter._global_features = lambda small: calls.append(1) or global_features(small)
    got = segmenter.predict_prepared(image, fov)
    assert calls == [1, 1, 1, 1]  # one GlobalNet pass per view
    reference = _flips_reference(plain.predict_view, image, fov)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    assert np.abs(got - plain.predict_view(image, fov)).max() > 1e-6
