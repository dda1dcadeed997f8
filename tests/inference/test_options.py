"""`rmib.inference.TilingOptions`: one value for the tiling options of the CLI, the loaders
and the Segmenters."""

from __future__ import annotations

import pytest

from rmib.errors import RmibError
from rmib.inference import TilingOptions


def test_options_given_one_by_one_override_the_tiling():
    base = TilingOptions("auto", halo=32)
    merged = TilingOptions.of(base, halo=16, max_tile=256, overlap=None)
    assert merged == TilingOptions("auto", None, None, 16, 256)
    assert base.halo == 32  # frozen: `of` makes a new value
    assert TilingOptions.of(None, tile=64) == TilingOptions(tile=64)
    assert TilingOptions.of() == TilingOptions()


def test_auto_only_options():
    assert not TilingOptions(64, 0.25, 2).auto_only
    assert TilingOptions("auto", halo=0).auto_only  # 0 is a choice, not "unset"
    assert TilingOptions(max_tile=512).auto_only


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_zero_one_is_refused(overlap):
    with pytest.raises(RmibError, match=rf"--overlap must be in \[0, 1\), got {overlap}"):
        TilingOptions(overlap=overlap)
    with pytest.raises(RmibError, match="--overlap must be in"):
        TilingOptions.of(TilingOptions(64), overlap=overlap)


def test_make_segmenter_takes_the_options_whole_or_one_by_one():
    import keras

    from rmib.tasks import make_segmenter

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    meta = {"model": "encoder-decoder", "lesion": "EX"}
    whole = make_segmenter(model, meta, tiling=TilingOptions(64, 0.25, 3))
    assert (whole.tile, whole.overlap, whole.batch_size) == (64, 0.25, 3)
    one_by_one = make_segmenter(model, meta, tiling=TilingOptions(64, 0.25), batch_size=5)
    assert (one_by_one.tile, one_by_one.overlap, one_by_one.batch_size) == (64, 0.25, 5)
    dual2net = {"model": "dual2net", "lesion": "EX", "image_size": [32, 32]}
    with pytest.raises(RmibError, match="--halo and --max-tile apply to encoder-decoder models"):
        make_segmenter(model, dual2net, tiling=TilingOptions(halo=8))
    with pytest.raises(RmibError, match="--overlap must be in"):
        make_segmenter(model, meta, overlap=1.0)
