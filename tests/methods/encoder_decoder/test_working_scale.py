"""`rmib segment --scale`: training at a working resolution, predicting back at full size."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from rmib import io
from rmib.data import fundus
from rmib.errors import RmibError
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter
from tests.conftest import invoke


def test_rescale_shapes_and_small_lesions():
    assert fundus.scaled_shape((2848, 4288, 3), 0.5) == (1424, 2144)
    assert fundus.scaled_shape((3, 5), 0.1) == (1, 1)
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 2:4] = 1  # one 2x2 lesion: one pixel at half scale
    mask[3, 0] = 1  # a single pixel covers a quarter of its output pixel: gone
    np.testing.assert_array_equal(fundus.rescale(mask, 0.5, "mask"), [[0, 1], [0, 0]])
    image = np.full((6, 8, 3), 7, np.uint8)
    assert fundus.rescale(image, 0.5).shape == (3, 4, 3)
    assert fundus.rescale(image, 1.0) is image
    for bad in (0, -0.5, 1.5, float("nan"), "half", True):
        with pytest.raises(RmibError, match="scale must be a number in"):
            fundus.check_scale(bad)


def _mean_model():
    """A 1x1 convolution giving the channel mean / 255: the answer is the image itself."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(
        1, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(1 / 765)
    )
    return keras.Model(inputs, conv(inputs))


def test_scale_one_is_the_full_resolution_path_exactly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    fov = np.ones((96, 128), np.uint8)
    fov[:, :8] = 0
    model = _mean_model()
    old = TiledSegmenter(model, {"predict_tile": 64}).predict_prepared(image, fov)
    scaled_one = TiledSegmenter(model, {"predict_tile": 64, "scale": 1.0})
    assert scaled_one.scale == 1.0
    new = scaled_one.predict_prepared(image, fov)
    np.testing.assert_array_equal(new, old)
    expected = image.astype(np.float64).mean(axis=-1) / 255 * fov
    np.testing.assert_allclose(new, expected, atol=1e-5)


def test_half_scale_predicts_a_full_resolution_map():
    image = np.full((96, 128, 3), 51, np.uint8)
    fov = np.zeros((96, 128), np.uint8)
    fov[8:88, 10:120] = 1
    segmenter = TiledSegmenter(_mean_model(), {"predict_tile": 32, "scale": 0.5})
    prob = segmenter.predict_prepared(image, fov)
    assert prob.shape == (96, 128) and prob.dtype == np.float32
    # 0.2 inside the field of view, away from its border (where the zeroed
    # outside of the half-size map blends in), and exactly 0 outside it.
    np.testing.assert_allclose(prob[12:84, 14:116], 0.2, atol=1e-5)
    assert not prob[fov == 0].any()
    assert segmenter.predict(np.full((70, 90, 3), 51, np.uint8)).shape == (70, 90)


def _segment_args(data, out, *more):
    return [
        "segment",
        "--data",
        data,
        "--lesion",
        "EX",
        "--patch-size",
        32,
        "--patches-per-epoch",
        8,
        "--batch-size",
        4,
        "--epochs",
        1,
        "--val-fraction",
        0.2,
        "--predict-tile",
        64,
        "--precision",
        "float32",
        "--out",
        out,
        *more,
    ]


def test_scaled_run_stores_its_scale_and_predicts_full_size(synthetic_idrid, tmp_path, eager):
    from rmib.tasks import load_segmenter

    run = tmp_path / "scaled"
    result = invoke(_segment_args(synthetic_idrid, run, "--scale", 0.5))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("encoder: vgg16 from scratch")
    assert "working scale 0.5" in result.output.splitlines()[0]
    assert json.loads((run / "rmib.json").read_text())["scale"] == 0.5
    assert "scale = 0.5" in (run / "config.toml").read_text()
    segmenter = load_segmenter(run)
    assert segmenter.scale == 0.5
    image_path = next((synthetic_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))
    image = io.read_image(image_path)
    assert segmenter.predict(image).shape == image.shape[:2]
    result = invoke(["predict", run, image_path, "--out", tmp_path / "pred"])
    assert result.exit_code == 0, result.output
    mask = io.read_mask(tmp_path / "pred" / f"{image_path.stem}_mask.png")
    assert mask.shape == image.shape[:2]
    result = invoke(["evaluate", run, "--data", synthetic_idrid, "--out", tmp_path / "ev"])
    assert result.exit_code == 0, result.output
    # The exported graph tiles at full resolution: a scaled run is refused, not served wrong.
    result = invoke(["export", run, "--format", "savedmodel", "--out", tmp_path / "sm"])
    assert result.exit_code == 1 and "scale 0.5" in result.output, result.output
    assert "Traceback" not in result.output


def test_bad_scale_is_refused_without_traceback(synthetic_idrid, tmp_path):
    for value in ("0", "1.5", "-1"):
        result = invoke(_segment_args(synthetic_idrid, tmp_path / "x", "--scale", value))
        assert result.exit_code == 1 and "scale must be in (0, 1]" in result.output, result.output
        assert value in result.output and "Traceback" not in result.output
    result = invoke(_segment_args(synthetic_idrid, tmp_path / "x", "--scale", "half"))
    assert result.exit_code == 2 and "half" in result.output
    result = invoke(
        _segment_args(synthetic_idrid, tmp_path / "x", "--scale", 0.5, "--model", "dual2net")
    )
    assert result.exit_code == 1 and "scale applies to the encoder-decoder" in result.output
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("scale = 2.0\n")
    result = invoke(_segment_args(synthetic_idrid, tmp_path / "x", "--config", recipe))
    assert result.exit_code == 1 and "scale" in result.output and "2.0" in result.output
    assert not (tmp_path / "x").exists()


def test_first_line_names_the_encoder(synthetic_idrid, pretrain_run, tmp_path):
    from rmib.methods.encoders import describe_encoder
    from rmib.methods.segment_config import SegmentConfig

    assert describe_encoder(SegmentConfig()) == (
        "encoder: vgg16 from scratch (random init, trainable; "
        "pass --encoder RUN to transfer a stage-1 classifier)"
    )
    transferred = describe_encoder(SegmentConfig(encoder=str(pretrain_run)))
    assert transferred == f"encoder: the stage-1 classifier of {pretrain_run}, transferred, frozen"
    named = SegmentConfig(encoder="resnet50", cbam=True, weights="imagenet")
    assert describe_encoder(named) == "encoder: resnet50+CBAM with imagenet weights, frozen"
    # The line comes before the data is read: a dry run prints it as a training does
    # (the scaled run above checks it in a training's output).
    result = invoke([*_segment_args(synthetic_idrid, tmp_path / "default"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == describe_encoder(SegmentConfig())
    assert "dry run" in result.output and not (tmp_path / "default").exists()
