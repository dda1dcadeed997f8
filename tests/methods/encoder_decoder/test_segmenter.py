"""`rmib.methods.encoder_decoder.segmenter.TiledSegmenter`: planned large tiles ("auto") against fixed tiles."""

from __future__ import annotations

import numpy as np
import pytest

from rmib.errors import RmibError
from rmib.inference.tiling import mask_box, plan_tiles

pytestmark = pytest.mark.timeout(300)


def _pointwise_model():
    """A 1x1 convolution with a sigmoid: its prediction does not depend on the tiling."""
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.Constant([[[[0.01], [-0.02], [0.005]]]]),
        bias_initializer=keras.initializers.Constant(0.3),
    )(inputs)
    return keras.Model(inputs, outputs)


def test_auto_tiles_cover_the_field_of_view_box_with_planned_tiles():
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:150, :230]
    fov = ((yy - 80) ** 2 + (xx - 120) ** 2 < 60**2).astype(np.uint8)
    segmenter = TiledSegmenter(
        _pointwise_model(), {"lesion": "EX"}, "auto", halo=8, max_tile_pixels=64 * 64
    )
    shapes, seen = [], []
    inner = segmenter._predict

    def recording(batch):
        shapes.append(tuple(batch.shape[1:3]))
        seen.append(int(batch.shape[0]))
        return inner(batch)

    segmenter._predict = recording
    prob = segmenter.predict_prepared(image, fov)
    box = mask_box(fov)
    assert box == (21, 61, 140, 180)
    tile = plan_tiles(box[2] - box[0], box[3] - box[1], 64 * 64, 16, 32)
    assert segmenter.last_plan == (tile, box)
    assert set(shapes) == {tile} and max(seen) == 1  # one large tile per call
    logits = image.astype(np.float64) @ np.array([0.01, -0.02, 0.005]) + 0.3
    expected = np.where(fov > 0, 1 / (1 + np.exp(-logits)), 0.0)
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    # the tiles predicted cover the box, not the whole image: fewer pixels than the image
    assert sum(seen) * tile[0] * tile[1] < image.shape[0] * image.shape[1]


def test_auto_tiles_are_closer_to_the_seamless_prediction_than_training_size_tiles():
    # A random VGG16 encoder-decoder on a 320x320 photograph: the prediction of the
    # whole image in one call has no tile borders. Large tiles with a 48-px halo stay
    # far closer to it than 160-px tiles (the training patch), even at overlap 0.5
    # (measured: mean |difference| 0.004 vs 0.013; 0.028 at the old overlap 0.125).
    import tensorflow as tf

    from rmib.data import synthetic
    from rmib.data.pipeline import Preprocessing, preprocess_array
    from rmib.methods.encoder_decoder.model import build_encoder_decoder
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    model = build_encoder_decoder("vgg16")
    image, _, _ = synthetic.synthesize_fundus((320, 320), seed=3, grade=3)
    prepared, _, _ = preprocess_array(image, Preprocessing())
    prepared = prepared[:320, :320]
    whole = model(tf.constant(prepared[None], tf.float32), training=False)[0, ..., 0].numpy()
    meta = {"lesion": "EX"}
    auto = TiledSegmenter(model, meta, "auto", halo=48, max_tile_pixels=224 * 224)
    planned = auto.predict_prepared(prepared)
    assert auto.last_plan == ((224, 224), None)  # 2 x 2 tiles overlapping by 128 px
    small = TiledSegmenter(model, meta, 160, overlap=0.5).predict_prepared(prepared)
    auto_error = np.abs(planned - whole).mean()
    small_error = np.abs(small - whole).mean()
    assert auto_error < small_error / 2, (auto_error, small_error)


def test_tiling_arguments_are_checked():
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter

    model = _pointwise_model()
    meta = {"lesion": "EX"}
    with pytest.raises(RmibError, match="with --tile auto tiles overlap by twice --halo"):
        TiledSegmenter(model, meta, "auto", overlap=0.25)
    with pytest.raises(RmibError, match="--halo and --max-tile apply to --tile auto"):
        TiledSegmenter(model, meta, 64, halo=8)
    with pytest.raises(RmibError, match="--halo and --max-tile apply to --tile auto"):
        TiledSegmenter(model, meta, 64, max_tile=256)
    with pytest.raises(RmibError, match="--max-tile must be a number of pixels >= 32, got 16"):
        TiledSegmenter(model, meta, "auto", max_tile=16)
    with pytest.raises(RmibError, match=r"allowed \(--max-tile\)"):
        TiledSegmenter(model, meta, "auto", halo=64, max_tile=128)  # needs 160 x 160
    with pytest.raises(RmibError, match="--tile must be 'auto' or a number of pixels, got 'big'"):
        TiledSegmenter(model, meta, "big")
    with pytest.raises(RmibError, match="--tile must be a multiple of 32, got 100"):
        TiledSegmenter(model, meta, 100)
    with pytest.raises(RmibError, match="--halo 600 needs tiles of at least 1216x1216"):
        TiledSegmenter(model, meta, "auto", halo=600)
    with pytest.raises(RmibError, match="--halo must be a non-negative number"):
        TiledSegmenter(model, meta, "auto", halo=-1)
    # the defaults: "auto" for runs that store no tile, the run's own tile otherwise
    assert TiledSegmenter(model, meta).tile == "auto"
    assert TiledSegmenter(model, meta).halo == 64
    old = TiledSegmenter(model, {**meta, "predict_tile": 512})
    assert (old.tile, old.overlap, old.batch_size) == (512, 0.125, 2)
    assert TiledSegmenter(model, {**meta, "predict_tile": "auto", "predict_halo": 40}).halo == 40
    assert TiledSegmenter(model, meta).max_tile_pixels == 1024 * 1024
    assert TiledSegmenter(model, meta, "auto", max_tile=384).max_tile_pixels == 384 * 384
    assert TiledSegmenter(model, {**meta, "predict_max_tile": 512}).max_tile_pixels == 512 * 512


def test_tiling_options_are_the_keyword_arguments():
    from rmib.inference import TilingOptions
    from rmib.methods.encoder_decoder.segmenter import TiledSegmenter, tiled_segmenter
    from rmib.methods.segment_config import SegmentConfig

    model = _pointwise_model()
    meta = {"lesion": "EX"}
    auto = TiledSegmenter(model, meta, tiling=TilingOptions("auto", halo=8, max_tile=96))
    assert (auto.tile, auto.halo, auto.max_tile_pixels, auto.batch_size) == ("auto", 8, 96**2, 1)
    fixed = TiledSegmenter(model, meta, tiling=TilingOptions(64, 0.5, 3))
    assert (fixed.tile, fixed.overlap, fixed.batch_size) == (64, 0.5, 3)
    # An argument given one by one overrides the options.
    assert TiledSegmenter(model, meta, 32, tiling=TilingOptions(64, 0.5)).tile == 32
    with pytest.raises(RmibError, match="--halo and --max-tile apply to --tile auto"):
        TiledSegmenter(model, meta, tiling=TilingOptions(64, halo=8))
    # A SegmentConfig's predict_* fields, as whole-image validation uses them.
    cfg = SegmentConfig(lesion="EX", predict_tile=64, predict_overlap=0.25, predict_batch=5)
    from_config = tiled_segmenter(model, meta, cfg)
    assert (from_config.tile, from_config.overlap, from_config.batch_size) == (64, 0.25, 5)
    cfg = SegmentConfig(lesion="EX", predict_halo=16, predict_max_tile=128)
    from_config = tiled_segmenter(model, meta, cfg)
    assert (from_config.tile, from_config.halo, from_config.max_tile_pixels) == ("auto", 16, 128**2)


def test_segment_config_predict_tile():
    from rmib.config import load_config
    from rmib.methods.segment_config import SegmentConfig

    assert SegmentConfig().predict_tile == "auto"
    assert load_config(SegmentConfig, None, {"predict_tile": 256}).predict_tile == 256
    for bad in ("big", 16):
        with pytest.raises(RmibError, match="predict_tile"):
            load_config(SegmentConfig, None, {"predict_tile": bad})
    with pytest.raises(RmibError, match="predict_halo"):
        load_config(SegmentConfig, None, {"predict_halo": -4})


def test_export_tiles_planned_runs_with_fixed_tiles():
    # segment_image of a SavedModel tiles every photograph the same way: a run whose
    # rmib predict plans its tiles ("auto") exports fixed 512-px tiles unless --tile says.
    from rmib.methods.encoder_decoder.export import export

    model = _pointwise_model()
    for meta in ({"lesion": "EX", "predict_tile": "auto"}, {"lesion": "EX"}):
        assert export(meta).tiling(model, meta, None, None, None) == (512, 0.125, 2)
        assert export(meta).tiling(model, meta, 256, 0.25, 3) == (256, 0.25, 3)
    fixed = {"lesion": "EX", "predict_tile": 128}
    assert export(fixed).tiling(model, fixed, None, None, None) == (128, 0.125, 2)
