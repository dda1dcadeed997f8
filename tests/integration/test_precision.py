"""Every precision on every machine: the tolerance, the switch of a trained model, and
train -> export --check -> serve under float32, mixed_bfloat16, mixed_float16 and "auto"
resolved as on a bfloat16 CPU and on a GPU (issue 15).

The precision of each run is set explicitly (or "auto" with the detection
monkeypatched), so no outcome here depends on the CPU that runs it; on CPUs
without native bfloat16 the mixed_bfloat16 runs are emulated, hence tiny.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib import training
from rmib.data import synthetic
from rmib.errors import RmibError
from rmib.methods.encoder_decoder.model import build_encoder_decoder
from rmib.models import build_classifier
from rmib.predict import read_probability_png
from rmib.training import devices, distributed
from rmib.training import devices as precision_lib
from tests.conftest import invoke, pretrain_args

pytestmark = pytest.mark.timeout(900)


def _graph(model):
    @tf.function
    def run(x):
        return tf.cast(model(x, training=False), tf.float32)

    return lambda x: run(tf.constant(x)).numpy()


def _copy_weights(source, target):
    target.set_weights(source.get_weights())
    return target


# --------------------------------------------------------------------------- tolerance


def test_check_tolerance_follows_from_the_significand_bits():
    # float32: rmib's 1e-4, above 2 * 2**-24. bfloat16: 8 bits -> u = 2**-8, a logit of
    # at most 8 moved by 8u, a probability by a quarter of that: 2u = 2**-7 = 0.0078125.
    # float16: 11 bits -> 2 * 2**-11 = 2**-10 = 0.0009765625.
    assert precision_lib.check_tolerance("float32") == 1e-4
    assert precision_lib.check_tolerance("mixed_bfloat16") == 0.0078125
    assert precision_lib.check_tolerance("mixed_float16") == 0.0009765625
    with pytest.raises(RmibError, match="unknown precision 'bfloat16'"):
        precision_lib.check_tolerance("bfloat16")


def test_precision_reasons_name_what_was_detected(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert training.precision_reason("auto", "mixed_bfloat16") == "auto: the CPU has avx512_bf16"
    cpuinfo.write_text("flags\t\t: fpu avx2 fma\n")
    assert training.precision_reason("auto", "float32") == (
        "auto: no GPU, and the CPU has no native bfloat16 (amx_bf16 or avx512_bf16)"
    )
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0", "GPU:1"])
    assert training.precision_reason("auto", "mixed_float16") == "auto: 2 GPU(s) visible"
    assert training.precision_reason("float32", "float32") == "asked for (--precision float32)"
    resolved, reason = precision_lib.resolve_predict_precision("training", "mixed_bfloat16")
    assert resolved == "mixed_bfloat16" and "trained in (mixed_bfloat16)" in reason
    assert precision_lib.resolve_predict_precision("training", None)[0] == "float32"
    with pytest.raises(RmibError, match="unknown precision 'half'.*float32, auto, training"):
        precision_lib.resolve_predict_precision("half", None)


# --------------------------------------------------------------------------- with_precision


def _built(policy, build):
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_classifier("vgg16", cbam=True, image_size=32, dense_units=8),
        lambda: build_encoder_decoder("vgg16", filters=(16, 8, 8, 4, 4), cbam=True),
    ],
    ids=["classifier", "encoder_decoder"],
)
def test_with_precision_equals_the_model_built_in_that_precision(build):
    """A switched model computes exactly as the same architecture built under the target policy."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    bf16 = _built("mixed_bfloat16", build)
    fp32 = _copy_weights(bf16, _built("float32", build))
    assert precision_lib.model_precision(bf16) == "mixed_bfloat16"
    bf16_out = _graph(bf16)(x)

    switched = precision_lib.with_precision(bf16, "float32")
    assert switched is bf16 and precision_lib.model_precision(switched) == "float32"
    np.testing.assert_allclose(_graph(switched)(x), _graph(fp32)(x), rtol=0, atol=1e-6)
    assert np.abs(_graph(switched)(x) - bf16_out).max() > 0  # it really changed

    # Back to bfloat16 from a float32 model: the same pinned float32 layers as a
    # bfloat16 build (the output head, the ImageNet normalisation), the same output.
    reference = _copy_weights(fp32, _built("mixed_bfloat16", build))
    back = precision_lib.with_precision(fp32, "mixed_bfloat16")

    def pinned(model):
        return sorted(
            layer.__class__.__name__
            for layer in precision_lib._all_layers(model)
            if layer.dtype_policy.name == "float32"
        )

    assert pinned(back) == pinned(reference) and pinned(back)
    np.testing.assert_array_equal(_graph(back)(x), _graph(reference)(x))
    assert _graph(back)(x).dtype == np.float32


# --------------------------------------------------------------------------- runs under bf16


def _export(run, out, *flags):
    result = invoke(["export", run, "--out", out, "--check", *flags])
    assert result.exit_code == 0, result.output
    return result.output


def _checked(output, precision):
    assert f"precision {precision}:" in output
    tolerance = precision_lib.check_tolerance(precision)
    found = re.findall(
        r"check (\w+): max abs difference (\S+) \(< (\S+), the tolerance of (\w+)\)", output
    )
    assert found, output
    for _, difference, shown, named in found:
        assert named == precision and float(shown) == pytest.approx(tolerance, rel=1e-3)
        assert float(difference) < tolerance
    return {name: float(difference) for name, difference, _, _ in found}


def test_bfloat16_classifier_exports_in_float32_and_in_bfloat16(pretrain_run_bf16, tmp_path):
    assert training.read_run_metadata(pretrain_run_bf16)["precision"] == "mixed_bfloat16"
    _checked(_export(pretrain_run_bf16, tmp_path / "fp32"), "float32")
    # Before issue 15 the check ran the bfloat16 Keras model eagerly against the
    # bfloat16 graph: 0.0012 apart. Now the same graph on both sides.
    differences = _checked(
        _export(pretrain_run_bf16, tmp_path / "bf16", "--precision", "training"), "mixed_bfloat16"
    )
    assert differences["classify"] < 1e-4

    images = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    served = {
        name: tf.saved_model.load(str(tmp_path / name))
        .signatures["classify"](images=tf.constant(images))["probability"]
        .numpy()
        for name in ("fp32", "bf16")
    }
    model = training.load_model(pretrain_run_bf16)
    np.testing.assert_allclose(served["bf16"], _graph(model)(images), atol=1e-6)
    float32 = _graph(precision_lib.with_precision(model, "float32"))(images)
    np.testing.assert_allclose(served["fp32"], float32, atol=1e-5)


def test_bfloat16_segmenter_exports_predicts_and_evaluates_in_each_precision(
    segment_run_bf16, synthetic_idrid, tmp_path
):
    _checked(_export(segment_run_bf16, tmp_path / "fp32", "--tile", 64), "float32")
    _checked(
        _export(segment_run_bf16, tmp_path / "bf16", "--tile", 64, "--precision", "training"),
        "mixed_bfloat16",
    )
    photo, _, _ = synthetic.synthesize_fundus(160, seed=3)
    from rmib import io

    io.write_image(tmp_path / "photo.png", photo)
    probs = {}
    for precision in ("float32", "mixed_bfloat16"):
        out = tmp_path / f"pred-{precision}"
        result = invoke(
            ["predict", segment_run_bf16, tmp_path / "photo.png", "--out", out,
             "--precision", precision]
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"precision {precision}: ")
        probs[precision] = read_probability_png(out / "photo_prob.png")
    assert probs["float32"].shape == probs["mixed_bfloat16"].shape == photo.shape[:2]
    assert 0 < np.abs(probs["float32"] - probs["mixed_bfloat16"]).max() < 0.5

    result = invoke(
        ["evaluate", segment_run_bf16, "--data", synthetic_idrid, "--out", tmp_path / "ev",
         "--split", "test", "--no-overlays", "--precision", "training"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith("precision mixed_bfloat16: the precision the model was")
    assert '"aupr"' in result.output


def test_keras_copy_keeps_the_trained_precision(pretrain_run_bf16, tmp_path):
    output = _export(pretrain_run_bf16, tmp_path / "copy.keras", "--format", "keras")
    _checked(output, "mixed_bfloat16")
    result = invoke(
        ["export", pretrain_run_bf16, "--out", tmp_path / "c2.keras", "--format", "keras",
         "--precision", "float32"]
    )  # fmt: skip
    assert result.exit_code == 1 and "keeps the precision the model was trained in" in (
        result.output
    )
    assert "Traceback" not in result.output and not (tmp_path / "c2.keras").exists()


def test_resume_under_mixed_bfloat16(synthetic_kaggle, tmp_path):
    out = tmp_path / "run"
    assert invoke(pretrain_args(synthetic_kaggle, out, "mixed_bfloat16", 1, 32)).exit_code == 0
    result = invoke([*pretrain_args(synthetic_kaggle, out, "mixed_bfloat16", 2, 32), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output
    model = training.load_model(out)
    assert precision_lib.model_precision(model) == "mixed_bfloat16"
    history = training.RunDirectory(out, create=False).read_history()
    assert [row["epoch"] for row in history] == [1, 2]


# --------------------------------------------------------------------------- auto, as elsewhere


@pytest.mark.parametrize(
    "machine, expected",
    [("bf16_cpu", "mixed_bfloat16"), ("gpu", "mixed_float16")],
)
def test_auto_trains_exports_checks_and_serves_as_on_that_machine(
    machine, expected, monkeypatch, synthetic_kaggle, tmp_path
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    gpus = ["GPU:0"] if machine == "gpu" else []
    monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
    out = tmp_path / "run"
    result = invoke(pretrain_args(synthetic_kaggle, out, "auto", epochs=1, image_size=32))
    assert result.exit_code == 0, result.output
    reason = "1 GPU(s) visible" if machine == "gpu" else "the CPU has avx512_bf16"
    assert f"precision {expected}: auto: {reason}" in result.output
    assert training.read_run_metadata(out)["precision"] == expected
    if expected == "mixed_float16":  # trained with loss scaling, as on a GPU
        model = training.load_model(out, compile=True)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    _checked(_export(out, tmp_path / "auto", "--precision", "auto"), expected)
    _checked(_export(out, tmp_path / "fp32"), "float32")
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    for name in ("auto", "fp32"):
        served = tf.saved_model.load(str(tmp_path / name)).signatures["classify"](
            images=tf.constant(images)
        )["probability"]
        assert served.dtype == tf.float32 and served.shape == (2, 1)
        assert np.all((served.numpy() >= 0) & (served.numpy() <= 1))


# --------------------------------------------------------------------------- float16


def test_float16_segmenter_exports_in_float16_and_float32(segment_run, tmp_path, monkeypatch):
    """A float16 export (for a GPU server), made and checked on a CPU: --check allows it."""
    _checked(
        _export(segment_run, tmp_path / "fp16", "--tile", 64, "--precision", "mixed_float16"),
        "mixed_float16",
    )
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    result = invoke(
        ["predict", segment_run, tmp_path / "x.png", "--out", tmp_path / "p",
         "--precision", "mixed_float16"]
    )  # fmt: skip
    assert result.exit_code == 1 and "needs a GPU" in result.output


def test_distributed_loop_skips_a_non_finite_float16_step_and_halves_the_loss_scale():
    """The runner's own `strategy.run` loop (multiworker) under mixed_float16: a batch whose
    gradients overflow leaves the weights untouched and halves the scale, as Keras' fit does."""
    from rmib.config import TrainConfig

    training.apply_precision("mixed_float16", allow_slow=True)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(hidden))
    cfg = TrainConfig(epochs=1, batch_size=2, precision="mixed_float16", tensorboard=False)
    model.compile(optimizer=training.make_optimizer(cfg, 1), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.optimizer.build(model.trainable_variables)
    scale = float(model.optimizer.dynamic_scale)
    before = [w.copy() for w in model.get_weights()]
    x = np.full((2, 4), 60000.0, np.float32)  # float16 overflows (max 65504) in the gradients
    y = np.zeros((2, 1), np.float32)
    distributed.distributed_fit(
        model, tf.distribute.get_strategy(), (x, y), None, cfg=cfg, batch_size=2,
        initial_epoch=0, steps_per_epoch=1, validation_steps=None, class_weight=None,
        callbacks=[], verbose=0,
    )  # fmt: skip
    for got, expected in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert float(model.optimizer.dynamic_scale) == scale / 2

    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    distributed.distributed_fit(
        model, tf.distribute.get_strategy(), (x, y), None, cfg=cfg, batch_size=2,
        initial_epoch=0, steps_per_epoch=1, validation_steps=None, class_weight=None,
        callbacks=[], verbose=0,
    )  # fmt: skip
    assert any(
        not np.array_equal(got, expected)
        for got, expected in zip(model.get_weights(), before, strict=True)
    )
    assert math.isfinite(float(model.optimizer.dynamic_scale))
