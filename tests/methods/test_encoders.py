"""rmib/methods/encoders.py: the transferred stage-1 encoder computes in the segmenter's precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rmib import training
from rmib.methods.encoders import encoder_factory
from rmib.methods.segment_config import SegmentConfig
from rmib.training.devices import _all_layers

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def policy_reset():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _built_under(policy, run):
    build, info, frozen = encoder_factory(SegmentConfig(lesion="EX", encoder=str(run)))
    assert info["encoder_weights"] == "stage-1" and frozen
    keras.mixed_precision.set_global_policy(policy)
    return build()


@pytest.mark.parametrize(
    "stage1, policy",
    [("pretrain_run", "mixed_bfloat16"), ("pretrain_run", "mixed_float16"),
     ("pretrain_run_bf16", "float32")],
)  # fmt: skip
def test_the_transferred_encoder_computes_in_the_segmenters_precision(
    request, policy_reset, stage1, policy
):
    """Keras restores the saved policy: a float32 stage 1 stayed float32 under auto's bf16."""
    run = request.getfixturevalue(stage1)
    trained = training.read_run_metadata(run)["precision"]
    assert trained != policy
    encoder = _built_under(policy, run)
    convs = [layer for layer in _all_layers(encoder) if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) >= 13  # VGG16's convolutions, CBAM's spatial ones too
    assert {layer.dtype_policy.name for layer in convs} == {policy}
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    taps = encoder(images, training=False)
    assert {keras.backend.standardize_dtype(tap.dtype) for tap in taps.values()} == {compute}

    # Only the arithmetic changes: the weights are the stage-1 run's, bit for bit.
    keras.mixed_precision.set_global_policy("float32")
    saved = training.load_model(run).get_layer("backbone")
    for ours, theirs in zip(encoder.weights, saved.weights, strict=True):
        assert ours.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_global_policy_is_kept_after_loading(policy_reset, pretrain_run):
    _built_under("mixed_bfloat16", pretrain_run)
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
