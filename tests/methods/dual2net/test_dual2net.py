"""Dual2Net with the DSM Dice loss: schedule, loss, gradients, layers, recipes, end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib import training
from rmib.config import TrainConfig, load_config
from rmib.data.pipeline import Preprocessing
from rmib.errors import RmibError
from rmib.losses import sample_rebalanced_pixels
from rmib.methods.dual2net.layers import BilinearUpsampling, PyramidPooling, adaptive_average_pool
from rmib.methods.dual2net.loss import DSMAlphaSchedule, dual2net_loss
from rmib.methods.dual2net.model import Dual2Net, build_dual2net
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter
from rmib.methods.dual2net.table import dual2net_table
from rmib.methods.dual2net.train import build_model, resolve_config, train
from rmib.methods.segment_config import Dual2NetConfig, SegmentConfig
from tests.helpers import run_model_checks

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- helpers


def np_dice(y, p, counts=None):
    """Smoothed Dice loss pooled over the batch, counts = draws per pixel (NumPy reference)."""
    c = np.ones_like(y) if counts is None else counts
    return 1.0 - (2.0 * np.sum(c * p * y) + 1.0) / (np.sum(c * p) + np.sum(c * y) + 1.0)


def tiny_dual2net(loss="dsm"):
    """A Dual2Net on a one-conv trunk: the real class and training step, at a tiny cost."""
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    trunk = keras.Model(image, {"features": x, "aux": x}, name="trunk")

    def head(name, dict_input):
        inputs = keras.Input((None, None, 4), name="features" if dict_input else "aux")
        outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(inputs)
        return keras.Model({"features": inputs} if dict_input else inputs, outputs, name=name)

    prefixes = ("large_", "small_") if loss == "dsm" else ("",)
    return Dual2Net(
        trunk,
        [head(f"{p}branch", True) for p in prefixes],
        [head(f"{p}aux", False) for p in prefixes],
        loss=loss,
    )


def tiny_ppm_dual2net():
    """A Dual2Net whose heads hold rmib's PyramidPooling and BilinearUpsampling, tiny."""
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv")(x)
    trunk = keras.Model(image, {"features": x, "aux": x}, name="trunk")

    def head(name, dict_input):
        inputs = keras.Input((None, None, 4), name="features" if dict_input else "aux")
        x = PyramidPooling(bins=(1, 2), filters=2)(inputs) if dict_input else inputs
        x = keras.layers.Conv2D(1, 1)(x)
        x = BilinearUpsampling(2)(x)
        outputs = keras.layers.Activation("sigmoid", dtype="float32")(x)
        return keras.Model({"features": inputs} if dict_input else inputs, outputs, name=name)

    prefixes = ("large_", "small_")
    return Dual2Net(
        trunk,
        [head(f"{p}branch", True) for p in prefixes],
        [head(f"{p}aux", False) for p in prefixes],
    )


def lesion_batch(rng, batch, height, width):
    y = np.zeros((batch, height, width, 1), np.float32)
    y[:, height // 4 : height // 2, width // 4 : width // 2] = 1.0
    y[0, 1, 1] = 1.0  # a one-pixel lesion too
    x = rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- loss and schedule


def test_loss_combines_the_four_terms_with_the_right_weights():
    rng = np.random.default_rng(0)
    shape = (2, 6, 5, 1)
    y_large = (rng.random(shape) < 0.3).astype(np.float32)
    y_small = (rng.random(shape) < 0.1).astype(np.float32)
    p_large, aux_large, p_small, aux_small = (rng.random(shape).astype(np.float32) for _ in "1234")
    counts = rng.integers(0, 4, shape).astype(np.float32)
    alpha = 0.75
    total, terms = dual2net_loss(
        alpha, y_large, p_large, aux_large, y_small, p_small, aux_small, counts, aux_weight=0.4
    )
    expected = {
        "dice_large": np_dice(y_large, p_large),
        "dice_small": np_dice(y_small, p_small, counts),
        "aux_large": np_dice(y_large, aux_large),
        # Eq. 8: the small branch's auxiliary head takes the plain Dice on the full label.
        "aux_small": np_dice(y_small, aux_small),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    want = (
        alpha * expected["dice_large"]
        + (1 - alpha) * expected["dice_small"]
        + 0.4 * (expected["aux_large"] + expected["aux_small"])
    )
    assert float(total) == pytest.approx(want, rel=1e-5)


def test_each_batch_goes_to_its_own_branch_with_the_models_alpha():
    model = tiny_dual2net()
    model.dsm_alpha.assign(0.3)
    rng = np.random.default_rng(1)
    x_large, y_large = lesion_batch(rng, 2, 8, 8)
    x_small, y_small = lesion_batch(rng, 2, 8, 8)
    y_small = y_small[:, ::-1]  # different masks for the two batches
    counts = np.asarray(sample_rebalanced_pixels(y_small, 0.5, seed=3))
    total, terms = model.compute_losses(((x_large, x_small), (y_large, y_small, counts)), False)

    def outputs(x, branch, aux):
        features = model.trunk(x)
        return np.asarray(branch({"features": features["features"]})), np.asarray(
            aux(features["aux"])
        )

    (large_branch, small_branch), (large_aux, small_aux) = model.branches, model.aux_heads
    p_large, a_large = outputs(x_large, large_branch, large_aux)
    p_small, a_small = outputs(x_small, small_branch, small_aux)
    want = (
        0.3 * np_dice(y_large, p_large)
        + 0.7 * np_dice(y_small, p_small, counts)
        + 0.4 * (np_dice(y_large, a_large) + np_dice(y_small, a_small))
    )
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(terms["dsm_alpha"]) == pytest.approx(0.3)


def test_both_auxiliary_losses_are_the_plain_dice_of_eq_8():
    """A 2x2 label, hand-worked. y = [1, 0, 0, 1], a = [0.5, 0.5, 0, 1]:
    sum(a*y) = 0.5 + 1 = 1.5, sum(a) = 2, sum(y) = 2, so eq. 8 with rmib's smoothing
    gives 1 - (2 * 1.5 + 1) / (2 + 2 + 1) = 1 - 4/5 = 0.2. A re-balanced sample that
    draws pixel 0 three times and pixel 2 once (counts [3, 0, 1, 0]) would give
    1 - (2 * 1.5 + 1) / (1.5 + 3 + 1) = 1 - 4/5.5 = 0.2727...: the aux term must not."""
    y = np.array([1, 0, 0, 1], np.float32).reshape(1, 2, 2, 1)
    aux = np.array([0.5, 0.5, 0.0, 1.0], np.float32).reshape(1, 2, 2, 1)
    counts = np.array([3, 0, 1, 0], np.float32).reshape(1, 2, 2, 1)
    p = np.full((1, 2, 2, 1), 0.5, np.float32)
    _, terms = dual2net_loss(0.5, y, p, aux, y, p, aux, counts)
    assert float(terms["aux_small"]) == pytest.approx(0.2, abs=1e-6)
    assert float(terms["aux_large"]) == pytest.approx(0.2, abs=1e-6)
    # The small branch's final classifier keeps the sampled Dice: p = 0.5 everywhere,
    # sum(c*p*y) = 1.5, sum(c*p) = 2, sum(c*y) = 3: 1 - (3 + 1) / (2 + 3 + 1) = 1/3.
    assert float(terms["dice_small"]) == pytest.approx(1.0 / 3.0, abs=1e-6)


def test_alpha_schedule_is_set_per_epoch_and_logged(tmp_path):
    rng = np.random.default_rng(2)
    x, y = lesion_batch(rng, 2, 8, 8)
    counts = sample_rebalanced_pixels(y, 0.5, seed=4)
    data = tf.data.Dataset.from_tensors(((x, x), (y, y, counts))).repeat(4)
    cfg = TrainConfig(
        epochs=4,
        batch_size=2,
        optimizer="sgd",
        learning_rate=0.01,
        monitor="loss",
        restore_best=False,
        precision="float32",
        tensorboard=False,
    )
    _, history = training.fit(
        tiny_dual2net,
        data,
        None,
        config=cfg,
        run_dir=tmp_path / "run",
        loss=None,
        extra_callbacks=[DSMAlphaSchedule(4)],
        steps_per_epoch=1,
        verbose=0,
    )
    expected = [1.0, 0.9375, 0.75, 0.4375]  # 1 - (e / 4)^2, e = 0, 1, 2, 3
    assert history["dsm_alpha"] == pytest.approx(expected)
    rows = training.RunDirectory(tmp_path / "run").read_history()
    assert [row["dsm_alpha"] for row in rows] == pytest.approx(expected)
    for row, alpha in zip(rows, expected, strict=True):  # one step per epoch: exact values
        want = (
            alpha * row["dice_large"]
            + (1 - alpha) * row["dice_small"]
            + 0.4 * (row["aux_large"] + row["aux_small"])
        )
        assert row["loss"] == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def vgg_dual2net():
    keras.utils.set_random_seed(0)
    return build_dual2net("vgg16", head_filters=8)


def test_both_branches_and_the_trunk_get_gradients_from_one_step(vgg_dual2net):
    model = vgg_dual2net
    model.dsm_alpha.assign(0.5)  # at alpha = 1 the small branch's own head gets no gradient
    rng = np.random.default_rng(3)
    x_large, y_large = lesion_batch(rng, 2, 32, 32)
    x_small, y_small = lesion_batch(rng, 2, 32, 32)
    counts = sample_rebalanced_pixels(y_small, 0.5, seed=5)
    data = ((x_large, x_small), (y_large, y_small, counts))
    with tf.GradientTape() as tape:
        total, _ = model.compute_losses(data, training=True)
    variables = model.trainable_variables
    gradients = dict(zip((id(v) for v in variables), tape.gradient(total, variables), strict=True))
    parts = [model.trunk, *model.branches, *model.aux_heads]
    assert [p.name for p in parts] == [
        "trunk",
        "large_branch",
        "small_branch",
        "large_aux",
        "small_aux",
    ]
    for part in parts:
        kernels = [v for v in part.trainable_variables if v.name == "kernel"]
        assert kernels, part.name
        for variable in kernels:
            gradient = gradients[id(variable)]
            assert gradient is not None, variable.path
            assert float(tf.reduce_max(tf.abs(gradient))) > 0, variable.path
    # The branches share nothing but the trunk: each copy of the last block is its own.
    large_block = model.branches[0].get_layer("block5_conv3").kernel
    small_block = model.branches[1].get_layer("block5_conv3").kernel
    assert large_block is not small_block
    np.testing.assert_array_equal(np.asarray(large_block), np.asarray(small_block))


def test_the_small_batch_does_not_reach_the_large_branch(vgg_dual2net):
    model = vgg_dual2net
    rng = np.random.default_rng(4)
    x_large, y_large = lesion_batch(rng, 1, 32, 32)
    x_small, y_small = lesion_batch(rng, 1, 32, 32)
    counts = sample_rebalanced_pixels(y_small, 0.5, seed=6)
    _, first = model.compute_losses(((x_large, x_small), (y_large, y_small, counts)), False)
    _, second = model.compute_losses(((x_large, 255 - x_small), (y_large, y_small, counts)), False)
    assert float(first["dice_large"]) == pytest.approx(float(second["dice_large"]), rel=1e-6)
    assert float(first["dice_small"]) != pytest.approx(float(second["dice_small"]), rel=1e-6)


def test_a_stage1_encoder_becomes_the_trunk_and_initialises_both_branches(tmp_path):
    from rmib.models import build_classifier

    classifier = build_classifier("vgg16", image_size=64)
    stage1 = training.RunDirectory(tmp_path / "stage1")
    stage1.write_metadata({"task": "pretrain", "backbone": "vgg16"})
    stage1.save_model(classifier, stage1.model_path)
    backbone = classifier.get_layer("backbone")
    cfg = SegmentConfig(model="dual2net", encoder=str(stage1.path), freeze_encoder="yes")
    cfg = dataclasses.replace(cfg, dual2net=Dual2NetConfig(head_filters=8))
    model = build_model(cfg)
    np.testing.assert_array_equal(
        np.asarray(model.trunk.get_layer("block1_conv1").kernel),
        np.asarray(backbone.get_layer("block1_conv1").kernel),
    )
    for branch in model.branches:
        np.testing.assert_array_equal(
            np.asarray(branch.get_layer("block5_conv3").kernel),
            np.asarray(backbone.get_layer("block5_conv3").kernel),
        )
    # freeze_encoder = "yes": the shared trunk is frozen, the branches' copies are not.
    assert not model.trunk.trainable_variables
    assert model.branches[0].get_layer("block5_conv3").trainable


FRESH_PROCESS_LOAD = """
import sys

import keras
import numpy as np

from rmib.training import load_model

model_path, x_path, out_path = sys.argv[1:]
# Nothing of Dual2Net is imported yet: loading has to find its classes.
assert "rmib.methods.dual2net.model" not in sys.modules
model = load_model(model_path)
classes = sorted({type(layer).__name__ for layer in model._flatten_layers()})
print(" ".join(classes))
np.save(out_path, keras.ops.convert_to_numpy(model(np.load(x_path), training=False)))
"""


def test_a_fresh_process_loads_a_saved_dual2net(tmp_path):
    # `rmib predict RUN` in a new process loads the model through rmib.training.load_model,
    # with nothing of Dual2Net imported: the real registry must find all its classes.
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    checks = run_model_checks(tiny_ppm_dual2net, x, tmp_path, output_shape=(2, 64, 64, 1))
    np.save(tmp_path / "x.npy", x)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, checks.path, tmp_path / "x.npy", tmp_path / "y.npy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    classes = done.stdout.split()
    for name in ("Dual2Net", "PyramidPooling", "BilinearUpsampling"):
        assert name in classes, classes
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), checks.outputs)


# --------------------------------------------------------------------------- layers


def test_adaptive_average_pool_matches_pytorch_bins():
    def dynamic(x, bins):  # sizes known only at run time
        spec = tf.TensorSpec((None, None, None, x.shape[-1]), tf.float32)
        return tf.function(lambda t: adaptive_average_pool(t, bins), input_signature=[spec])(x)

    x = np.random.default_rng(5).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for bins in (1, 2, 3, 6):
        want = np.zeros((2, bins, bins, 3), np.float32)
        for i in range(bins):
            y0, y1 = (i * 5) // bins, -((-(i + 1) * 5) // bins)
            for j in range(bins):
                x0, x1 = (j * 7) // bins, -((-(j + 1) * 7) // bins)
                want[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
        np.testing.assert_allclose(np.asarray(adaptive_average_pool(x, bins)), want, atol=1e-5)
        if bins == 3:
            np.testing.assert_allclose(np.asarray(dynamic(x, bins)), want, atol=1e-5)
    # Hand-worked: 3 columns into 2 bins averages columns {0, 1} and {1, 2}.
    row = np.array([[[[1.0], [2.0], [6.0]]]], np.float32)
    np.testing.assert_allclose(np.asarray(adaptive_average_pool(row, 2))[0, 0, :, 0], [1.5, 4.0])


def test_pyramid_pooling_bins_use_one_group_norm_per_image():
    layer = PyramidPooling(bins=(1, 2), filters=3)
    x = np.random.default_rng(8).normal(size=(2, 4, 6, 4)).astype(np.float32)
    y = np.asarray(layer(x, training=True))
    norms = list(layer.norms)
    assert all(isinstance(n, keras.layers.GroupNormalization) and n.groups == 1 for n in norms)
    # NumPy reference of the 2x2 bin: pool, 1x1 conv, normalise each image over all its
    # bins and channels (gamma 1, beta 0 at the start), ReLU. The same in training and
    # at inference, and independent of the other image of the batch.
    pooled = np.asarray(adaptive_average_pool(x, 2), np.float64)
    z = pooled @ np.asarray(layer.convs[1].kernel, np.float64)[0, 0]
    mean = z.mean(axis=(1, 2, 3), keepdims=True)
    var = z.var(axis=(1, 2, 3), keepdims=True)
    want = np.maximum((z - mean) / np.sqrt(var + norms[1].epsilon), 0.0)
    got = np.asarray(tf.image.resize(want.astype(np.float32), (4, 6), method="bilinear"))
    np.testing.assert_allclose(y[..., 7:10], got, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), y, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x[1:], training=True)), y[1:], atol=1e-5)


def test_a_model_saved_with_batch_norm_bins_is_refused_with_a_reason(tmp_path, monkeypatch):
    """Dual2Net files saved before the bins used GroupNorm (batch norm there) do not load."""

    class BatchNormalization(keras.layers.BatchNormalization):  # the old bins' layer
        def __init__(self, groups=None, **kwargs):
            super().__init__(**kwargs)

    inputs = keras.Input((6, 6, 4))
    with monkeypatch.context() as patch:
        patch.setattr(keras.layers, "GroupNormalization", BatchNormalization)
        old = keras.Model(inputs, PyramidPooling(bins=(1, 2), filters=2, name="ppm")(inputs))
    old.save(tmp_path / "old.keras")
    with pytest.raises(RmibError, match=r"old\.keras: cannot load the model: .*bin1_gn.*CHANGELOG"):
        training.load_model(tmp_path / "old.keras")


def test_pyramid_pooling_keeps_its_input_and_round_trips():
    layer = PyramidPooling(bins=(1, 2), filters=3)
    x = np.random.default_rng(6).normal(size=(1, 5, 7, 4)).astype(np.float32)
    y = np.asarray(layer(x))
    assert y.shape == (1, 5, 7, 4 + 2 * 3)
    np.testing.assert_array_equal(y[..., :4], x)
    # The 1x1 bin is constant over the map.
    np.testing.assert_allclose(y[..., 4:7], np.broadcast_to(y[:, :1, :1, 4:7], y[..., 4:7].shape))
    clone = PyramidPooling.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_bilinear_upsampling_works_on_sizes_known_only_at_run_time():
    layer = BilinearUpsampling(4)
    x = np.random.default_rng(7).random((1, 3, 5, 1)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
    def run(batch):
        return layer(batch)

    expected = keras.layers.UpSampling2D(4, interpolation="bilinear")(x)
    np.testing.assert_allclose(np.asarray(run(x)), np.asarray(expected), atol=1e-6)


def test_segmenter_resizes_back_and_undoes_the_fov_crop():
    from rmib.data.synthetic import synthesize_fundus

    image, _, _ = synthesize_fundus((80, 120), seed=3)
    inputs = keras.Input((None, None, 3))
    red = keras.layers.Conv2D(1, 1, use_bias=False)  # p = R / 255
    model = keras.Model(inputs, red(inputs))
    red.set_weights([np.array([1.0 / 255, 0, 0], np.float32).reshape(1, 1, 3, 1)])
    metadata = {
        "task": "segment",
        "model": "dual2net",
        "image_size": [64, 96],
        "preprocessing": Preprocessing(method="none", fov_crop=True).to_dict(),
    }
    prob = Dual2NetSegmenter(model, metadata).predict(image)
    assert prob.shape == image.shape[:2] and prob.dtype == np.float32
    from rmib.data import fundus

    fov = fundus.fov_mask(image).astype(bool)
    assert np.all(prob[~fov] == 0)
    # Resizing down and back blurs the red channel a little, nothing more.
    assert np.mean(np.abs(prob[fov] - image[..., 0][fov] / 255.0)) < 0.03
    with pytest.raises(RmibError, match="image_size"):
        Dual2NetSegmenter(model, {"task": "segment", "model": "dual2net"})


# --------------------------------------------------------------------------- config and recipes


def test_paper_defaults_replace_only_untouched_settings():
    cfg, notes = resolve_config(SegmentConfig(model="dual2net"))
    t = cfg.train
    assert (t.optimizer, t.learning_rate, t.momentum, t.weight_decay) == ("sgd", 0.03, 0.9, 5e-4)
    assert t.weight_decay_mode == "coupled"
    assert (t.lr_schedule, t.poly_power, t.batch_size, cfg.augment) == ("poly", 0.9, 2, "rot90")
    assert t.monitor == "val_aupr" and notes
    own = SegmentConfig(
        model="dual2net",
        augment="none",
        train=TrainConfig(learning_rate=1e-4, lr_schedule="plateau", batch_size=4),
    )
    cfg, _ = resolve_config(own)
    t = cfg.train
    assert (t.learning_rate, t.lr_schedule, t.batch_size, cfg.augment) == (
        1e-4,
        "plateau",
        4,
        "none",
    )
    # Values left at SegmentConfig's defaults (here the optimizer) take the paper's.
    assert (t.optimizer, t.weight_decay) == ("sgd", 5e-4)


def test_without_validation_the_last_epoch_is_kept():
    cfg, _ = resolve_config(SegmentConfig(model="dual2net"), has_validation=False)
    assert (cfg.train.monitor, cfg.train.restore_best) == ("loss", False)
    custom = SegmentConfig(train=TrainConfig(monitor="val_f1"))
    with pytest.raises(RmibError, match="val_f1"):
        resolve_config(custom, has_validation=False)
    with pytest.raises(RmibError, match="fine_tune_after"):
        resolve_config(SegmentConfig(fine_tune_after=2))


def test_the_paper_backbone_gives_120x180_branch_features_for_960x1440():
    model = build_dual2net("resnet50", head_filters=8)
    image = keras.Input((960, 1440, 3))
    features = model.trunk(image)
    assert tuple(features["features"].shape[1:]) == (120, 180, 2048)
    assert tuple(features["aux"].shape[1:]) == (120, 180, 1024)
    for branch in model.branches:
        block = branch.get_layer("conv5_block3_2_conv")
        assert block.dilation_rate == (4, 4)  # the copy of the last block keeps conv5's
        assert tuple(branch(features["features"]).shape[1:]) == (960, 1440, 1)
    assert tuple(model.aux_heads[0](features["aux"]).shape[1:]) == (960, 1440, 1)
    # The old stride stays available: 30x45 features at output stride 32.
    plain = build_dual2net("resnet50", head_filters=8, output_stride=32)
    assert tuple(plain.trunk(image)["features"].shape[1:3]) == (30, 45)
    # A tiny forward pass of the stride-8 model, and of its decoder head.
    x = np.random.default_rng(9).uniform(0, 255, (1, 64, 96, 3)).astype(np.float32)
    assert tuple(model(x).shape) == (1, 64, 96, 1)
    decoder = build_dual2net("resnet50", head="decoder", loss="dice", head_filters=8)
    assert tuple(decoder(x).shape) == (1, 64, 96, 1)


def test_a_stride_32_encoder_model_is_rebuilt_at_stride_8_with_its_weights():
    from rmib.models import build_backbone

    encoder = build_backbone("resnet50", model_name="backbone")
    rng = np.random.default_rng(10)
    for weight in encoder.weights:
        weight.assign(rng.normal(0, 0.01, weight.shape).astype("float32"))
    model = build_dual2net(encoder, loss="dice", head_filters=8)
    trunk_conv = model.trunk.get_layer("conv4_block2_2_conv")
    assert trunk_conv.dilation_rate == (2, 2)
    np.testing.assert_array_equal(
        np.asarray(trunk_conv.kernel), np.asarray(encoder.get_layer("conv4_block2_2_conv").kernel)
    )
    np.testing.assert_array_equal(
        np.asarray(model.branches[0].get_layer("conv5_block3_2_conv").kernel),
        np.asarray(encoder.get_layer("conv5_block3_2_conv").kernel),
    )
    with pytest.raises(RmibError, match="vgg16 cannot be built at output_stride 8"):
        build_dual2net("vgg16", output_stride=8)
    with pytest.raises(RmibError, match="output_stride must be 8, 16 or 32"):
        Dual2NetConfig(output_stride=4)


def test_the_branches_copies_of_cbam_start_as_the_encoders():
    from rmib.models import CBAM, build_backbone

    encoder = build_backbone("vgg16", cbam=True, cbam_init="woo", model_name="backbone")
    model = build_dual2net(encoder, head_filters=8)
    for branch in model.branches:
        copy = branch.get_layer("block5_cbam")
        assert isinstance(copy, CBAM) and copy.init == "woo"
        np.testing.assert_array_equal(
            np.asarray(copy.spatial_conv.kernel),
            np.asarray(encoder.get_layer("block5_cbam").spatial_conv.kernel),
        )
    plain = build_dual2net("vgg16", cbam=True, loss="dice", head_filters=8)
    assert plain.branches[0].get_layer("block5_cbam").init == "identity"


def test_image_size_must_be_two_multiples_of_32():
    assert Dual2NetConfig(image_size=[64, 96]).image_size == [64, 96]
    for bad in ([960, 1000], [960], [0, 64]):
        with pytest.raises(RmibError, match="image_size"):
            Dual2NetConfig(image_size=bad)


@pytest.mark.parametrize(
    "name, size, fov_crop, epochs",
    [
        ("idrid_ex_dual2net", [960, 1440], False, 40),
        ("ddr_ex_dual2net", [1024, 1024], True, 100),
        ("idrid_ex_dual2net_ablation", [960, 1440], False, 40),
    ],
)
def test_recipes_load(name, size, fov_crop, epochs):
    path = ROOT / "segment" / f"{name}.toml"
    cfg = load_config(SegmentConfig, path)
    assert cfg.model == "dual2net" and cfg.lesion == "EX"
    assert cfg.dual2net.image_size == size and cfg.dual2net.fov_crop is fov_crop
    assert cfg.train.epochs == epochs and cfg.train.optimizer == "sgd"
    assert cfg.train.learning_rate == 0.03 and cfg.train.weight_decay == 5e-4
    assert cfg.dual2net.variant == "dual-dsm" and cfg.augment == "rot90"
    # As the paper: dilated ResNet50 at stride 8, weight decay coupled as PyTorch's SGD.
    assert cfg.encoder == "resnet50" and cfg.dual2net.output_stride == 8
    assert cfg.train.weight_decay_mode == "coupled"
    # Section 4.2: momentum 0.9, poly 0.9, batch 2, ImageNet; PSPNet's head, aux 0.4; N1/N 0.5.
    assert (cfg.train.momentum, cfg.train.lr_schedule, cfg.train.poly_power) == (0.9, "poly", 0.9)
    assert cfg.train.batch_size == 2 and cfg.weights == "imagenet"
    assert (cfg.dual2net.head, cfg.dual2net.aux_weight, cfg.dual2net.pos_fraction) == (
        "ppm",
        0.4,
        0.5,
    )
    if "ablation" in name:
        for variant in ("single-bce", "single-dice"):
            other = load_config(SegmentConfig, path, {"dual2net.variant": variant})
            assert other.dual2net.variant == variant


def test_ablation_table_follows_the_papers_layout(tmp_path):
    paper = {  # IDRiD columns of Table 4 and Table 8
        "single-bce": (0.9632, 0.3361, 0.4983, 0.8254),
        "single-dice": (0.7358, 0.7819, 0.7582, 0.9388),
        "dual-dsm": (0.7748, 0.7572, 0.7659, 0.9469),
    }
    runs = []
    for variant in ("dual-dsm", "single-bce", "single-dice"):
        run = training.RunDirectory(tmp_path / variant)
        params = 75_300_000 if variant == "dual-dsm" else 49_000_000
        run.write_metadata(
            {
                "model": "dual2net",
                "variant": variant,
                "backbone": "resnet50",
                "head": "ppm",
                "parameters": params,
            }
        )
        sn, ppv, f1, f02 = paper[variant]
        run.update_metrics(
            {
                "validation": {
                    "sensitivity": sn,
                    "ppv": ppv,
                    "f1": f1,
                    "iou": 0.5,
                    "aupr": 0.8,
                    "region_f_score": {"0.2": f02},
                }
            }
        )
        runs.append(run.path)
    text = dual2net_table(runs, out=tmp_path / "table.md")
    rows = [line for line in text.splitlines() if line.startswith("| ResNet50") or "Dual" in line]
    assert rows[0] == "| ResNet50-PPM + CBCE | 49.0M | 0.9632 | 0.3361 | 0.4983 | 0.5000 | 0.8000 |"
    assert rows[1].startswith("| ResNet50-PPM + Dice | 49.0M | 0.7358 | 0.7819 | 0.7582 |")
    assert rows[2].startswith("| Dual ResNet50-PPM + DSM | 75.3M | 0.7748 | 0.7572 | 0.7659 |")
    assert "| Dual ResNet50-PPM + DSM | 0.9469 | - | - | - | - |" in text
    assert (tmp_path / "table.md").read_text() == text
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"sensitivity": 0.1, "ppv": 0.2, "f1": 0.3}))
    text = dual2net_table(runs[:1], evaluations=[evaluation])
    assert "| Dual ResNet50-PPM + DSM | 75.3M | 0.1000 | 0.2000 | 0.3000 | - | - |" in text
    with pytest.raises(RmibError, match="one per run"):
        dual2net_table(runs, evaluations=[evaluation])


# --------------------------------------------------------------------------- end to end


@pytest.mark.integration  # a whole training run, then prediction: in make test, not make quick
def test_train_then_predict_a_full_size_map(tmp_path):
    from rmib.data.readers import read_dataset
    from rmib.data.synthetic import write_dataset
    from rmib.io import read_image
    from rmib.tasks import load_segmenter

    root = write_dataset(tmp_path / "data", "idrid", count=6, size=96, seed=0)
    records = read_dataset(root).with_lesion("EX")
    with_lesion = [r for r in records if r.masks.get("EX") is not None]
    val = with_lesion[:1]
    train_records = [r for r in records if r not in val]
    cfg = SegmentConfig(
        data=[str(root)],
        model="dual2net",
        encoder="vgg16",
        out=str(tmp_path / "run"),
        train=TrainConfig(
            epochs=1,
            batch_size=1,
            steps_per_epoch=2,
            monitor="val_aupr",
            precision="float32",
            tensorboard=False,
        ),
        dual2net=Dual2NetConfig(image_size=[32, 64], head_filters=8),
    )
    run = training.RunDirectory(tmp_path / "run")
    result = train(cfg, train_records, val, run, verbose=0)

    assert 0.0 <= result["aupr"] <= 1.0 and 0.0 <= result["f1"] <= 1.0
    assert set(result["region_f_score"]) == {"0.2", "0.35", "0.5", "0.65", "0.8"}
    metadata = training.read_run_metadata(run.model_path)
    assert (metadata["task"], metadata["model"], metadata["lesion"]) == (
        "segment",
        "dual2net",
        "EX",
    )
    assert metadata["image_size"] == [32, 64] and metadata["variant"] == "dual-dsm"
    assert metadata["preprocessing"]["method"] == "clahe" and metadata["parameters"] > 0
    history = run.read_history()
    assert len(history) == 1 and history[0]["dsm_alpha"] == 1.0 and "val_aupr" in history[0]
    resolved = load_config(SegmentConfig, run.config_path)  # the paper's settings were used
    assert (resolved.train.optimizer, resolved.train.learning_rate) == ("sgd", 0.03)
    assert resolved.dual2net.image_size == [32, 64]

    segmenter = load_segmenter(run.path)
    assert isinstance(segmenter, Dual2NetSegmenter)
    image = read_image(val[0].image)
    prob = segmenter.predict(image)
    assert prob.shape == image.shape[:2] and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0 and prob.max() > 0.0
    # The saved model is the mean of the two branches of the trained network.
    network = segmenter.model
    x = np.random.default_rng(8).uniform(0, 255, (1, 32, 64, 3)).astype(np.float32)
    features = network.get_layer("trunk")(x)
    branches = [network.get_layer(n) for n in ("large_branch", "small_branch")]
    maps = [np.asarray(b({"features": features["features"]})) for b in branches]
    np.testing.assert_allclose(np.asarray(network(x)), (maps[0] + maps[1]) / 2, atol=1e-6)
