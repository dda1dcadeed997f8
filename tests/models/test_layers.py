"""CBAM, the in-model ImageNet preprocessing and the fused batch norm, against references."""

import keras
import numpy as np
import pytest

from rmib.models import CBAM, FusedBatchNormalization, ImageNetPreprocessing
from tests.helpers import run_model_checks

from .helpers import (
    assert_config_round_trip,
    assert_output,
    dtype_policy,
    fit_one_step,
)

pytestmark = pytest.mark.timeout(180)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _conv_same(x, kernel, bias):
    """Cross-correlation with zero 'same' padding: x (B,H,W,Cin), kernel (k,k,Cin,Cout)."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],), dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy : dy + height, dx : dx + width, :]
            out += np.einsum("bhwc,co->bhwo", window, kernel[dy, dx])
    return out + bias


def cbam_reference(x, w_hidden, b_hidden, w_out, b_out, kernel, bias):
    """CBAM of Woo et al. (ECCV 2018), eqs. 2-3, written out in float64 NumPy."""
    x = x.astype(np.float64)

    def mlp(v):
        return np.maximum(v @ w_hidden + b_hidden, 0.0) @ w_out + b_out

    channel = _sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))
    refined = x * channel[:, None, None, :]
    pooled = np.concatenate(
        [refined.mean(axis=-1, keepdims=True), refined.max(axis=-1, keepdims=True)], axis=-1
    )
    spatial = _sigmoid(_conv_same(pooled, kernel, bias))
    return refined * spatial


def _randomised_cbam(channels, ratio, kernel_size, seed=0, **kwargs):
    layer = CBAM(ratio=ratio, kernel_size=kernel_size, **kwargs)
    layer.build((None, None, None, channels))
    rng = np.random.default_rng(seed)
    # Non-zero biases, so a forgotten bias shows up.
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.weights])
    return layer


@pytest.mark.parametrize(
    "shape, ratio, kernel_size",
    [((2, 9, 13, 32), 16, 7), ((1, 6, 5, 8), 16, 3), ((2, 4, 4, 48), 4, 1)],
)
def test_cbam_matches_numpy_reference(shape, ratio, kernel_size):
    layer = _randomised_cbam(shape[-1], ratio, kernel_size)
    x = np.random.default_rng(1).normal(0, 2, shape).astype("float32")
    expected = cbam_reference(x, *[np.array(w) for w in layer.weights])
    got = assert_output(layer, x, shape, "float32")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _training_pass(layer, x, upstream, implementation, dynamic=False):
    """Output and gradients (input, then every weight) of one training-mode call;
    `dynamic`: traced with unknown batch and spatial sizes (the fused pass's argmax path).
    """
    import tensorflow as tf

    layer.implementation = implementation

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(out, "float32") * upstream)
        return [out, *tape.gradient(loss, [x, *layer.trainable_weights])]

    if dynamic:
        spec = tf.TensorSpec((None, None, None, x.shape[-1]), "float32")
        run = tf.function(run, input_signature=[spec])
    return [np.array(keras.ops.cast(t, "float32")) for t in run(tf.constant(x))]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize(
    "policy, shape, ratio, kernel_size, tolerance",
    [
        ("float32", (2, 5, 4, 16), 4, 3, 1e-5),
        ("float32", (1, 3, 6, 8), 16, 1, 1e-5),
        ("mixed_bfloat16", (2, 5, 4, 16), 4, 3, 3e-2),
    ],
)
def test_cbam_fused_training_pass_matches_the_formula(
    policy, shape, ratio, kernel_size, tolerance, dynamic
):
    # The fused pass (own gradient, rmib.models.cbam_training) against the formula left to
    # tf.GradientTape (implementation "plain"): same output (also against the NumPy
    # reference), same gradients for the input and all six weights.
    layer = _randomised_cbam(shape[-1], ratio, kernel_size, dtype=policy)
    rng = np.random.default_rng(11)
    x = rng.normal(0, 2, shape).astype("float32")
    upstream = rng.normal(0, 1, shape).astype("float32")
    fused = _training_pass(layer, x, upstream, "fused", dynamic)
    plain = _training_pass(layer, x, upstream, "plain", dynamic)
    assert CBAM.implementation == "fused"
    expected = cbam_reference(x, *[np.array(w) for w in layer.weights])
    np.testing.assert_allclose(fused[0], expected, rtol=tolerance, atol=tolerance)
    assert len(fused) == 1 + 1 + 6
    for got, want in zip(fused, plain, strict=True):
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * scale)
        assert np.abs(want).max() > 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_cbam_fused_gradient_gives_a_tied_maximum_to_the_first(dynamic):
    # A constant map: every element ties for the maximum over space and over channels.
    # TensorFlow's reduce_max gradient splits each maximum's gradient evenly, the fused
    # pass gives it to the first element; both add up to the same totals, and the
    # weights' gradients (which see only the maxima's values) are the same.
    layer = _randomised_cbam(4, 2, 3)
    x = np.full((1, 3, 3, 4), 0.5, "float32")
    upstream = np.random.default_rng(12).normal(0, 1, x.shape).astype("float32")
    fused = _training_pass(layer, x, upstream, "fused", dynamic)
    plain = _training_pass(layer, x, upstream, "plain", dynamic)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(fused[1].sum(), plain[1].sum(), rtol=1e-5, atol=1e-6)
    assert np.abs(fused[1] - plain[1]).max() > 1e-3  # the split differs, as documented
    for got, want in zip(fused[2:], plain[2:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cbam_weights_follow_the_paper_shapes():
    # C=32, r=16 -> 2 hidden units; C=8, r=16 -> max(1, 0) = 1 hidden unit.
    layer = _randomised_cbam(32, 16, 7)
    assert [tuple(w.shape) for w in layer.weights] == [
        (32, 2),
        (2,),
        (2, 32),
        (32,),
        (7, 7, 2, 1),
        (1,),
    ]
    assert layer.count_params() == 32 * 2 + 2 + 2 * 32 + 32 + 7 * 7 * 2 + 1
    assert tuple(_randomised_cbam(8, 16, 7).weights[0].shape) == (8, 1)


def test_cbam_pools_channel_attention_over_space():
    # Changing one corner pixel must change the output at the far corner. The 3x3
    # spatial conv reaches one pixel only; what carries the change that far is the
    # channel attention pooled over H, W. Pooling over channels (the defect of the
    # authors' notebooks) would leave the far corner unchanged.
    layer = _randomised_cbam(16, 4, 3)
    x = np.ones((1, 4, 4, 16), "float32")
    y = x.copy()
    y[0, 0, 0] = 5.0
    out_x = np.array(layer(x))
    out_y = np.array(layer(y))
    assert not np.allclose(out_x[0, 3, 3], out_y[0, 3, 3])


def test_cbam_config_round_trip_and_validation():
    clone = assert_config_round_trip(CBAM(ratio=8, kernel_size=5, name="att"))
    assert (clone.ratio, clone.kernel_size, clone.name) == (8, 5, "att")
    with pytest.raises(ValueError, match="ratio"):
        CBAM(ratio=0)
    with pytest.raises(ValueError, match="kernel_size"):
        CBAM(kernel_size=4)


def test_cbam_mixed_bfloat16_computes_in_bfloat16_with_float32_variables():
    layer = _randomised_cbam(32, 16, 7, dtype="mixed_bfloat16")
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
    x = np.random.default_rng(2).normal(0, 1, (2, 8, 8, 32)).astype("float32")
    got = np.array(keras.ops.cast(assert_output(layer, x, x.shape, "bfloat16"), "float32"))
    expected = cbam_reference(x, *[np.array(w) for w in layer.weights])
    np.testing.assert_allclose(got, expected, rtol=5e-2, atol=5e-2)


def test_cbam_frozen_sublayers_stay_frozen(tmp_path):
    # A frozen CBAM inside a trainable model (a frozen encoder) stays frozen on load.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, name="conv")(inputs)
    attention = CBAM(ratio=2, name="att")
    model = keras.Model(inputs, attention(x))
    attention.trainable = False
    assert len(model.trainable_weights) == 2
    loaded = run_model_checks(model, np.ones((1, 8, 8, 3), "float32"), tmp_path).loaded
    assert [w.path for w in loaded.trainable_weights] == ["conv/kernel", "conv/bias"]


def test_cbam_in_a_model_fits_and_round_trips(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = CBAM(ratio=4, kernel_size=3)(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (4, 16, 16, 3)).astype("float32")
    y = (rng.uniform(size=(4, 16, 16, 1)) > 0.5).astype("float32")
    fit_one_step(model, x, y)
    run_model_checks(model, x, tmp_path)


def test_imagenet_preprocessing_matches_keras_applications():
    x = np.random.default_rng(4).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(np.array(ImageNetPreprocessing()(x)), expected, atol=1e-4)
    np.testing.assert_allclose(
        keras.applications.resnet50.preprocess_input(x.copy()), expected, atol=1e-4
    )
    # Hand-worked pixel: RGB (10, 20, 30) -> BGR (30, 20, 10) minus (103.939, 116.779, 123.68).
    pixel = np.array(ImageNetPreprocessing()(np.array([[[[10, 20, 30]]]], "float32")))
    np.testing.assert_allclose(pixel[0, 0, 0], [-73.939, -96.779, -113.68], atol=1e-4)
    with dtype_policy("mixed_bfloat16"):
        layer = ImageNetPreprocessing()
    assert layer.compute_dtype == "float32"
    assert_config_round_trip(layer)


def _twin_batch_norms(channels, seed=5):
    rng = np.random.default_rng(seed)
    values = [
        rng.normal(1, 0.2, channels),
        rng.normal(0, 0.2, channels),
        rng.normal(0, 0.5, channels),
        rng.uniform(0.5, 2, channels),
    ]
    pair = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(epsilon=1.001e-5, momentum=0.9)
        layer.build((None, None, None, channels))
        layer.set_weights([v.astype("float32") for v in values])
        pair.append(layer)
    return pair


@pytest.mark.parametrize("training", [False, True])
def test_fused_batch_norm_matches_keras_batch_norm(training):
    reference, fused = _twin_batch_norms(6)
    # 2 x 2 x 3 = 12 values per channel: the n/(n-1) variance correction would show.
    x = np.random.default_rng(6).normal(3, 2, (2, 2, 3, 6)).astype("float32")
    np.testing.assert_allclose(
        np.array(fused(x, training=training)),
        np.array(reference(x, training=training)),
        rtol=1e-5,
        atol=1e-5,
    )
    for got, expected in zip(fused.weights, reference.weights, strict=True):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-6)
    if training:
        # Hand-derived update: moving = 0.9 * moving + 0.1 * biased batch statistic.
        _, _, mean0, var0 = [np.array(w) for w in _twin_batch_norms(6)[0].weights]
        np.testing.assert_allclose(
            np.array(fused.moving_variance),
            0.9 * var0 + 0.1 * x.reshape(-1, 6).var(axis=0),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            np.array(fused.moving_mean),
            0.9 * mean0 + 0.1 * x.reshape(-1, 6).mean(axis=0),
            rtol=1e-5,
        )


def test_fused_batch_norm_gradients_match_keras_batch_norm():
    import tensorflow as tf

    reference, fused = _twin_batch_norms(4)
    x = tf.constant(np.random.default_rng(7).normal(0, 1, (2, 3, 3, 4)).astype("float32"))
    weights = np.random.default_rng(8).normal(0, 1, (2, 3, 3, 4)).astype("float32")
    grads = []
    for layer in (reference, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * weights)
        grads.append(tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]))
    for got, expected in zip(grads[1], grads[0], strict=True):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_bfloat16_and_fallback():
    with dtype_policy("mixed_bfloat16"):
        layer = FusedBatchNormalization()
        x = np.random.default_rng(9).normal(0, 1, (2, 4, 4, 3)).astype("float32")
        assert keras.backend.standardize_dtype(layer(x, training=True).dtype) == "bfloat16"
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
    # 2-D inputs take the Keras path and still normalise: batch mean 0, variance ~1.
    flat = np.array(FusedBatchNormalization()(np.arange(8.0).reshape(4, 2), training=True))
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.var(axis=0), 1.0, atol=1e-2)
    assert_config_round_trip(FusedBatchNormalization(epsilon=1.001e-5, name="bn"))


def test_cbam_starts_as_a_near_identity_gate():
    """Zero attention kernels, bias b: Mc = sigmoid(b/2 + b/2), Ms = sigmoid(b) everywhere."""
    f = np.random.default_rng(7).normal(0, 3, (2, 6, 5, 32)).astype("float32")
    layer = CBAM(ratio=4, kernel_size=3, gate_bias=3.0)
    gate = 1.0 / (1.0 + np.exp(-3.0))  # sigmoid(3) = 0.952574...
    np.testing.assert_allclose(np.array(layer(f)), f * gate * gate, rtol=1e-5, atol=1e-6)
    assert_config_round_trip(layer)
    assert CBAM.from_config(layer.get_config()).gate_bias == 3.0


def test_cbam_woo_init_has_keras_default_kernels_and_zero_biases(tmp_path):
    layer = CBAM(ratio=4, kernel_size=7, init="woo")
    layer.build((None, None, None, 32))
    weights = {w.path.split("/")[-2] + "/" + w.name: np.array(w) for w in layer.weights}
    kernels = {k: v for k, v in weights.items() if k.endswith("kernel")}
    biases = {k: v for k, v in weights.items() if k.endswith("bias")}
    assert sorted(kernels) == ["mlp_hidden/kernel", "mlp_output/kernel", "spatial_conv/kernel"]
    for name, kernel in kernels.items():
        # Glorot-uniform: |w| <= sqrt(6 / (fan_in + fan_out)), and not all zero.
        fan_in = int(np.prod(kernel.shape[:-1]))
        fan_out = int(kernel.shape[-1]) * (
            int(np.prod(kernel.shape[:-2])) if kernel.ndim > 2 else 1
        )
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= limit + 1e-7, name
        assert np.abs(kernel).max() > 0.5 * limit, name
    for name, bias in biases.items():
        np.testing.assert_array_equal(bias, 0.0, err_msg=name)
    # The default start is unchanged: zero logit kernels, biases gate_bias / 2 and gate_bias.
    default = CBAM(ratio=4, kernel_size=7)
    default.build((None, None, None, 32))
    np.testing.assert_array_equal(np.array(default.mlp_output.kernel), 0.0)
    np.testing.assert_array_equal(np.array(default.spatial_conv.kernel), 0.0)
    np.testing.assert_array_equal(np.array(default.mlp_output.bias), 1.5)
    np.testing.assert_array_equal(np.array(default.spatial_conv.bias), 3.0)
    assert default.init == "identity"
    # The init is part of the config and survives a .keras round trip.
    assert CBAM.from_config(layer.get_config()).init == "woo"
    inputs = keras.Input((8, 8, 32))
    model = keras.Model(inputs, CBAM(ratio=4, init="woo", name="cbam")(inputs))
    path = tmp_path / "woo.keras"
    model.save(path)
    assert keras.saving.load_model(path).get_layer("cbam").init == "woo"


def test_cbam_woo_gates_are_the_sigmoid_of_the_raw_attention():
    """init="woo": no gate bias, so each gate is the sigmoid of the raw attention logit.

    Worked by hand with the woo layer's own zero biases and kernels set to small
    numbers: C = 2, ratio 2 (one hidden unit), a 1x1 spatial convolution; the input
    has two pixels, f = [1, 0] and [3, 2].
    Channel: avg = [2, 1], max = [3, 2]; hidden = relu(v @ [1, 1]) = 3 and 5;
    MLP(avg) + MLP(max) = 3 * [1, -1] + 5 * [1, -1] = [8, -8]: Mc = sigmoid([8, -8]).
    Spatial, kernel [1, 0] on [mean_c, max_c]: z = mean_c(f * Mc), per pixel
    sigmoid(8) / 2 and (3 sigmoid(8) + 2 sigmoid(-8)) / 2; Ms = sigmoid(z).
    With init="identity" the same kernels give other gates: its biases
    (gate_bias / 2 twice, gate_bias) shift both logits by 3.
    """
    f = np.array([[[[1.0, 0.0], [3.0, 2.0]]]], np.float32)  # (1, 1, 2, 2)
    mc = _sigmoid(np.array([8.0, -8.0]))
    refined = f[0, 0] * mc
    ms = _sigmoid(refined.mean(axis=-1))
    want = refined * ms[:, None]

    def with_hand_kernels(init):
        layer = CBAM(ratio=2, kernel_size=1, init=init)
        layer.build((None, None, None, 2))
        layer.mlp_hidden.kernel.assign(np.array([[1.0], [1.0]], np.float32))
        layer.mlp_output.kernel.assign(np.array([[1.0, -1.0]], np.float32))
        layer.spatial_conv.kernel.assign(np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1))
        return np.array(layer(f))[0, 0]

    np.testing.assert_allclose(with_hand_kernels("woo"), want, rtol=1e-5, atol=1e-7)
    identity = with_hand_kernels("identity")
    mc3 = _sigmoid(np.array([8.0 + 3.0, -8.0 + 3.0]))
    refined3 = f[0, 0] * mc3
    np.testing.assert_allclose(
        identity, refined3 * _sigmoid(refined3.mean(axis=-1) + 3.0)[:, None], rtol=1e-5
    )
    assert np.abs(identity - want).max() > 0.01

    # As initialised (random Glorot kernels, zero biases), the layer is CBAM on its own
    # weights with no bias, and its gates depend on the input: not the identity start's
    # constant sigmoid(3)^2 = 0.907.
    x = np.random.default_rng(3).normal(0, 1, (2, 5, 4, 16)).astype("float32")
    layer = CBAM(ratio=4, kernel_size=3, init="woo")
    out = np.array(layer(x))
    w = [np.array(v) for v in layer.weights]
    np.testing.assert_allclose(out, cbam_reference(x, *w), rtol=1e-4, atol=1e-6)
    gate = out / x
    assert gate.std() > 0.01 and abs(gate.mean() - 0.25) < 0.15


def test_cbam_rejects_an_unknown_init():
    with pytest.raises(ValueError, match="init must be one of identity, woo, got 'kaiming'"):
        CBAM(init="kaiming")
