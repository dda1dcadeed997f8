"""The U-Net of the local-global segmenter (Yan et al. 2019): widths, shapes, weights, training."""

import keras
import numpy as np
import pytest

from rmib.models.unet import build_unet, build_unet_trunk, unet_filters
from tests.helpers import run_model_checks

from .helpers import assert_output, dtype_policy, fit_one_step

pytestmark = pytest.mark.timeout(240)


def test_widths_double_per_level_up_to_the_cap():
    assert unet_filters(6, 32, 512) == [32, 64, 128, 256, 512, 512, 512]
    assert unet_filters(3) == [32, 64, 128, 256]
    assert unet_filters(2, 4, 8) == [4, 8, 8]
    with pytest.raises(ValueError, match="depth"):
        unet_filters(0)
    with pytest.raises(ValueError, match="max_filters"):
        unet_filters(2, 32, 16)


def test_weight_count_by_hand():
    # depth 1, base 2 -> widths [2, 4]; convs have no bias (batch norm: 4 values per channel).
    # enc0a 3*3*3*2=54 +8, enc0b 3*3*2*2=36 +8, bottom_a 3*3*2*4=72 +16,
    # bottom_b 3*3*4*4=144 +16, up0 2*2*4*2+2=34, dec0a (concat 4 ch) 3*3*4*2=72 +8,
    # dec0b 36 +8, head 2+1=3: 515.
    model = build_unet(1, base_filters=2, max_filters=8)
    assert model.count_params() == 515


def test_output_shape_dtype_and_cap():
    model = build_unet(3, base_filters=4, max_filters=8, name="tiny")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 48, 3)).astype("float32")
    out = assert_output(model, x, (2, 32, 48, 1))
    assert 0.0 <= out.min() and out.max() <= 1.0
    trunk = model.get_layer("tiny_trunk")
    assert trunk.output.shape[-1] == 4  # the decoder's last map has base_filters channels
    bottom = trunk.get_layer("tiny_trunk_bottom_b_conv")
    assert bottom.filters == 8  # 4 * 2**3 = 32, capped at 8
    names = [layer.name for layer in trunk.layers]
    assert sum(n.endswith("_conv") for n in names) == 2 * (2 * 3 + 1)  # two per level
    assert sum(n.startswith("tiny_trunk_pool") for n in names) == 3


def test_trunk_layer_names_carry_its_name():
    trunk = build_unet_trunk(2, base_filters=2, name="global_trunk")
    assert all(w.path.startswith("global_trunk_") for w in trunk.weights)


def test_one_training_step_moves_every_weight_and_save_load(tmp_path):
    model = build_unet(2, base_filters=4, l2=1e-4, name="unet_fit")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    y = (rng.uniform(size=(2, 16, 16, 1)) > 0.8).astype("float32")
    assert len(model.losses) == 2 * (2 * 2 + 1) + 2 + 1  # L2 on every conv, up-conv, head
    fit_one_step(model, x, y, run_eagerly=True)
    run_model_checks(model, x, tmp_path, output_shape=(2, 16, 16, 1))


def test_mixed_precision_keeps_float32_output():
    with dtype_policy("mixed_bfloat16"):
        model = build_unet(1, base_filters=2)
    out = model(np.zeros((1, 8, 8, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
