"""Memory of whole-photograph prediction: per pixel, only the photograph and its maps.

`rmib predict` on a 6000x4000 photograph must need, beyond the photograph and
its output maps, no more memory than on a 4288x2848 one. The peak of the
memory NumPy (and OpenCV's outputs) allocate is measured with tracemalloc at
two photograph sizes; its growth per added pixel is what every full-size
array costs together, and the tile batches, the model and the strips of
temporaries are constants that cancel out. Before these checks, prediction
held a float32 copy of the photograph (12 bytes/pixel), a float32 weight sum
(4), index arrays to zero the outside of the field of view, and overlay and
quantisation temporaries in float64 (~50): ~60 bytes/pixel in all.

tracemalloc sees NumPy's allocations only (not TensorFlow's or OpenCV's
internal buffers); `benchmarks/tiled.py` (`--only tiled_prediction`) measures the
resident memory of the real 4288x2848 and 6000x4000 case.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)

SIZES = ((1000, 1500), (2000, 3000))  # (H, W): 1.5 and 6 megapixels
PHOTO = 3  # bytes per pixel: uint8 RGB
PROB, MASK, OVERLAY = 4, 1, 3  # the output maps: float32 probability, uint8 mask, RGB overlay
# What preprocessing needs: the preprocessed photograph (uint8 RGB) and its field of view.
PREPROCESSED, FOV = 3, 1
SLACK = 1  # bytes per pixel of rounding in the measurement


def _photograph(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A fundus-like photograph: a textured orange disc on a black surround."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    centre, radius = (width // 2, height // 2), int(min(height, width) * 0.47)
    cv2.circle(image, centre, radius, (170, 80, 40), -1)
    image[..., 1] += rng.integers(0, 30, size=(height, width), dtype=np.uint8)
    cv2.circle(image, (width // 3, height // 2), max(3, radius // 20), (250, 240, 120), -1)
    return image


@pytest.fixture(scope="module")
def segmenter():
    """A tiny fully convolutional segmenter (tiles of 256, CLAHE), traced once."""
    import keras

    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    metadata = {"lesion": "EX", "preprocessing": {"method": "clahe"}}
    segmenter = TiledSegmenter(model, metadata, tile=256, overlap=0.125, batch_size=2)
    segmenter.predict(_photograph(300, 400))  # traces the prediction function
    return segmenter


def _peak(function, *args) -> int:
    """Peak bytes traced while `function(*args)` runs, above what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        function(*args)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _growth_per_pixel(measure) -> float:
    """Bytes per pixel by which the peak grows from the small to the large photograph."""
    (h1, w1), (h2, w2) = SIZES
    small, large = measure(h1, w1), measure(h2, w2)
    return (large - small) / (h2 * w2 - h1 * w1)


def test_predict_tiled_holds_only_its_output(segmenter):
    """Tiles are cast batch by batch and the weights summed per axis: only the float32
    output (4 bytes/pixel) is image-sized; the uint8 image and mask are the caller's."""
    from rmib.data import fundus
    from rmib.inference.tiling import predict_tiled

    def measure(height, width):
        image = _photograph(height, width)
        fov = fundus.fov_mask(image)
        return _peak(
            lambda: predict_tiled(
                lambda tiles: segmenter._predict(tiles), image, 256, 0.125, 2, mask=fov
            )
        )

    growth = _growth_per_pixel(measure)
    assert growth <= PROB + 0.5, f"{growth:.2f} bytes/pixel"


def test_segmenter_predict_grows_by_its_map_and_preprocessing_only(segmenter):
    def measure(height, width):
        image = _photograph(height, width)  # the photograph itself is not counted
        return _peak(segmenter.predict, image)

    growth = _growth_per_pixel(measure)
    assert growth <= PROB + PREPROCESSED + FOV + SLACK, f"{growth:.2f} bytes/pixel"


def test_rmib_predict_grows_by_the_photograph_and_its_maps_only(segmenter, tmp_path):
    """`rmib predict`'s loop (read, predict, write three maps): per pixel, the photograph
    and its maps and no more (the preprocessed copy is gone before the maps exist)."""
    from rmib import io
    from rmib.predict import predict_files

    def measure(height, width):
        path = tmp_path / f"photo_{width}x{height}.png"
        io.write_image(path, _photograph(height, width))
        out = tmp_path / f"out_{width}x{height}"
        peak = _peak(predict_files, segmenter, [path], out)
        assert {p.name for p in out.iterdir()} == {
            f"{path.stem}_{kind}.png" for kind in ("prob", "mask", "overlay")
        } | {"predictions.csv"}
        return peak

    growth = _growth_per_pixel(measure)
    assert growth <= PHOTO + PROB + MASK + OVERLAY + 2 * SLACK, f"{growth:.2f} bytes/pixel"


def test_strip_by_strip_outputs_equal_the_whole_array_ones(segmenter, tmp_path, monkeypatch):
    """The maps `rmib predict` writes in strips equal those computed on whole arrays."""
    from rmib import io, metrics, predict, report

    monkeypatch.setattr(predict, "STRIP_PIXELS", 7 * 333)  # many strips, a ragged last one
    image = _photograph(250, 333, seed=1)
    path = tmp_path / "photo.png"
    io.write_image(path, image)
    predict.predict_files(segmenter, [path], tmp_path / "out", threshold=0.5)

    prob = segmenter.predict(image)
    assert 0 < (prob >= 0.5).sum() < prob.size  # the mask has both values
    written = predict.read_probability_png(tmp_path / "out" / "photo_prob.png")
    np.testing.assert_array_equal(
        np.rint(written * 65535).astype(np.uint16), metrics.quantize16(prob)
    )
    mask = (prob >= 0.5).astype(np.uint8)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "out" / "photo_mask.png"), mask)
    colour = report.LESION_COLOURS["EX"]
    expected = report.mask_outline_overlay(
        report.probability_overlay(image, prob, colour), mask, colour
    )
    np.testing.assert_array_equal(io.read_image(tmp_path / "out" / "photo_overlay.png"), expected)


def test_planned_tiles_grow_by_the_map_and_preprocessing_only(segmenter):
    """--tile auto: the tiles are cut from a view of the field of view's box and the
    output is written through a view of the whole map: no extra image-sized array."""
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    auto = TiledSegmenter(
        segmenter.model, segmenter.metadata, "auto", halo=32, max_tile_pixels=512 * 512
    )
    auto.predict(_photograph(300, 400))  # traces the prediction function

    def measure(height, width):
        return _peak(auto.predict, _photograph(height, width))

    growth = _growth_per_pixel(measure)
    assert auto.last_plan[0][0] * auto.last_plan[0][1] <= 512 * 512
    assert growth <= PROB + PREPROCESSED + FOV + SLACK, f"{growth:.2f} bytes/pixel"
