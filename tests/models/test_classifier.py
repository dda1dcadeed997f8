"""The stage-1 lesion classifier: four variants build and train; head; save/load."""

import keras
import numpy as np
import pytest

from rmib.errors import RmibError
from rmib.models import build_backbone, build_classifier
from tests.helpers import run_model_checks

from .helpers import assert_output, dtype_policy, fit_one_step

pytestmark = pytest.mark.timeout(600)

SIZE = 64


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    return x, np.array([[0.0], [1.0]], "float32")


# Eager steps: a graph trace of ResNet50 costs half a minute on a shared CPU; the
# graph path is covered by the encoder-decoder tests and the slow test below.
@pytest.mark.parametrize(
    "backbone, cbam", [("vgg16", False), ("vgg16", True), ("resnet50", False), ("resnet50", True)]
)
def test_variant_builds_and_trains_one_step(backbone, cbam):
    model = build_classifier(backbone, cbam=cbam, image_size=SIZE)
    expected_name = f"{backbone}_cbam" if cbam else backbone
    assert model.name == f"{expected_name}_classifier"
    encoder = model.get_layer("backbone")
    assert isinstance(encoder, keras.Model)
    x, y = _batch()
    probabilities = assert_output(model, x, (2, 1), "float32")
    assert np.all((probabilities > 0) & (probabilities < 1))
    fit_one_step(model, x, y, run_eagerly=True)


def test_head_follows_the_paper():
    model = build_classifier("vgg16", image_size=SIZE, dense_units=8, dropout=0.25, l2=1e-3)
    head = model.layers[2:]
    assert [type(layer).__name__ for layer in head] == [
        "GlobalAveragePooling2D",
        "Dense",
        "BatchNormalization",
        "Activation",
        "Dropout",
        "Dense",
    ]
    assert model.layers[1] is model.get_layer("backbone")
    assert head[3].activation is keras.activations.relu
    assert head[4].rate == 0.25
    assert head[1].units == 8 and head[1].activation is keras.activations.linear
    assert head[5].units == 1 and head[5].activation is keras.activations.sigmoid
    # The L2 penalty is l2 * sum(kernel^2) on the hidden dense kernel, nothing else.
    kernel = np.array(head[1].kernel, dtype=np.float64)
    assert len(model.losses) == 1
    np.testing.assert_allclose(float(model.losses[0]), 1e-3 * np.sum(kernel**2), rtol=1e-5)


def test_output_is_float32_under_mixed_bfloat16_and_trains():
    with dtype_policy("mixed_bfloat16"):
        # 32 px (P5 is 1x1): bfloat16 convolutions are slow on CPUs without AVX512-BF16.
        model = build_classifier("resnet50", cbam=True, image_size=32)
        assert model.get_layer("backbone").get_layer("conv2_block1_cbam").compute_dtype == (
            "bfloat16"
        )
        x, y = _batch(1)
        x = x[:, :32, :32]
        assert_output(model, x, (2, 1), "float32")
        fit_one_step(model, x, y, run_eagerly=True)
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in model.weights)


def test_backbone_model_is_used_as_is():
    backbone = build_backbone("vgg16", cbam=True)
    model = build_classifier(backbone, image_size=SIZE)
    assert model.get_layer("backbone") is backbone
    assert model.name == "vgg16_cbam_classifier"
    with pytest.raises(ValueError, match="cbam"):
        build_classifier(build_backbone("vgg16"), cbam=True, image_size=SIZE)


@pytest.mark.parametrize("backbone, cbam", [("vgg16", True), ("resnet50", False)])
def test_save_load_round_trip_gives_equal_predictions(backbone, cbam, tmp_path):
    model = build_classifier(backbone, cbam=cbam, image_size=SIZE)
    x, _ = _batch(2)
    loaded = run_model_checks(model, x, tmp_path, output_shape=(2, 1)).loaded
    assert loaded.get_layer("backbone").name == "backbone"


@pytest.mark.slow
def test_resnet50_cbam_trains_one_graph_step():
    model = build_classifier("resnet50", cbam=True, image_size=SIZE)
    x, y = _batch(3)
    fit_one_step(model, x, y)


def test_head_batch_norm_catches_up_within_a_few_dozen_steps():
    """After 25 training-mode passes the moving mean is within 10 % of the batch mean.

    With Keras' default momentum 0.99 it would still be 0.99^25 = 78 % the initial 0.
    """
    model = build_classifier("vgg16", image_size=SIZE)
    x, _ = _batch()
    dense = keras.Model(model.input, model.get_layer("head_dense").output)
    batch_mean = np.asarray(dense(x, training=True)).mean(axis=0)
    for _ in range(25):
        model(x, training=True)
    moving = np.asarray(model.get_layer("head_bn").moving_mean)
    assert np.abs(moving - batch_mean).max() <= 0.1 * np.abs(batch_mean).max()


def test_cbam_init_is_a_classifier_option_kept_by_save_and_load(tmp_path):
    from rmib.config import load_config
    from rmib.methods.classifier.config import PretrainConfig
    from rmib.models import CBAM

    cfg = load_config(PretrainConfig, None, {"cbam": True, "cbam_init": "woo"})
    model = build_classifier("vgg16", cbam=cfg.cbam, cbam_init=cfg.cbam_init, image_size=32)
    path = tmp_path / "classifier.keras"
    model.save(path)
    backbone = keras.saving.load_model(path).get_layer("backbone")
    modules = [layer for layer in backbone.layers if isinstance(layer, CBAM)]
    assert len(modules) == 5 and {m.init for m in modules} == {"woo"}
    with pytest.raises(RmibError, match="cbam_init"):
        load_config(PretrainConfig, None, {"cbam_init": "kaiming"})


def test_rmib_pretrain_passes_cbam_init_to_the_config(tmp_path, monkeypatch):
    import rmib.tasks
    from tests.conftest import invoke

    seen = []
    monkeypatch.setattr(rmib.tasks, "run_pretrain", lambda cfg, resume=False, **_: seen.append(cfg))
    (tmp_path / "data").mkdir()
    base = ["pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run", "--cbam"]
    assert invoke([*base, "--cbam-init", "woo"]).exit_code == 0
    assert invoke(base).exit_code == 0
    assert [cfg.cbam_init for cfg in seen] == ["woo", "identity"]
    result = invoke([*base, "--cbam-init", "kaiming"])
    assert result.exit_code == 2 and "identity" in result.output and "woo" in result.output
