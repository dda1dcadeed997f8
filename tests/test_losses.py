import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib import losses

pytestmark = pytest.mark.timeout(120)
LN2 = math.log(2.0)


def reference_weighted_bce(y_true, y_prob, gamma):
    """Eq. 2 of Yan et al. written out image by image in NumPy."""
    y_prob = np.clip(y_prob.astype(np.float64), 1e-7, 1 - 1e-7)
    per_image = []
    for truth, prob in zip(y_true, y_prob, strict=True):
        truth, prob = truth.ravel() > 0.5, prob.ravel()
        n_pos, n_neg = truth.sum(), (~truth).sum()
        positive = np.log(prob[truth]).sum()
        negative = np.log(1 - prob[~truth]).sum()
        weight = n_neg / (gamma * n_pos) if n_pos else 0.0
        per_image.append(-(weight * positive + negative) / truth.size)
    return float(np.mean(per_image))


# ------------------------------------------------------------------ weighted BCE


def test_weighted_bce_hand_worked():
    # Image 1: 1 lesion pixel of 4, every p = 0.5, so w = 3 / (gamma * 1) and
    #   L1 = -(w * ln 0.5 + 3 * ln 0.5) / 4 = (w + 3) ln2 / 4.
    # Image 2: no lesion, p = 0.5: L2 = -(4 * ln 0.5) / 4 = ln 2 (negative term only).
    y = np.zeros((2, 2, 2, 1), np.float32)
    y[0, 0, 0, 0] = 1
    p = np.full_like(y, 0.5)
    # gamma 1: w = 3, L1 = 1.5 ln2; mean = (1.5 + 1) ln2 / 2 = 1.25 ln2
    assert float(losses.weighted_bce(y, p)) == pytest.approx(1.25 * LN2, rel=1e-6)
    # gamma 2: w = 1.5, L1 = 1.125 ln2; mean = (1.125 + 1) ln2 / 2 = 1.0625 ln2
    assert float(losses.weighted_bce(y, p, gamma=2.0)) == pytest.approx(1.0625 * LN2, rel=1e-6)
    # (B, H, W) works the same
    assert float(losses.weighted_bce(y[..., 0], p[..., 0])) == pytest.approx(1.25 * LN2, rel=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 3.0])
def test_weighted_bce_matches_numpy(gamma):
    rng = np.random.default_rng(0)
    y = (rng.random((3, 6, 5, 1)) < 0.2).astype(np.float32)
    y[1] = 0  # an image without lesion
    y[2, 0, 0, 0] = 1
    p = rng.random(y.shape).astype(np.float32)
    p[0, 0, 0, 0] = 0.0  # clipped, not -inf
    expected = reference_weighted_bce(y, p, gamma)
    assert float(losses.weighted_bce(y, p, gamma)) == pytest.approx(expected, rel=1e-5)


def test_weighted_bce_empty_masks_finite_with_finite_gradient():
    y = tf.zeros((2, 4, 4, 1))
    p = tf.Variable(tf.fill((2, 4, 4, 1), 0.25))
    with tf.GradientTape() as tape:
        loss = losses.weighted_bce(y, p)
    grad = tape.gradient(loss, p)
    assert float(loss) == pytest.approx(-math.log(0.75), rel=1e-6)
    assert np.all(np.isfinite(grad.numpy()))


def test_weighted_bce_float16_inputs_computed_in_float32():
    y = np.zeros((1, 4, 4, 1), np.float16)
    y[0, :2] = 1
    loss = losses.weighted_bce(y, np.full_like(y, 0.5))
    assert loss.dtype == "float32"
    # w = 8 / 8 = 1: L = -(8 ln .5 + 8 ln .5) / 16 = ln 2
    assert float(loss) == pytest.approx(LN2, rel=1e-3)


def test_weighted_bce_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma must be positive, got 0"):
        losses.weighted_bce(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), gamma=0)


# ------------------------------------------------------------------ BCE and Dice


def test_bce_matches_numpy():
    rng = np.random.default_rng(1)
    y = (rng.random((2, 5, 5, 1)) < 0.3).astype(np.float32)
    p = rng.random(y.shape).astype(np.float32)
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert float(losses.bce(y, p)) == pytest.approx(expected, rel=1e-5)
    # y = 1, p = 0.5 everywhere: ln 2
    assert float(losses.bce(np.ones((1, 2, 2)), np.full((1, 2, 2), 0.5))) == pytest.approx(LN2)


def test_dice_hand_worked():
    y = np.zeros((1, 2, 2, 1), np.float32)
    y[0, 0, 0] = 1
    # perfect: (2 * 1 + 1) / (1 + 1 + 1) = 1 -> loss 0
    assert float(losses.dice_loss(y, y)) == pytest.approx(0.0, abs=1e-7)
    # p = 0.5 everywhere: (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5 -> loss 0.5
    assert float(losses.dice_loss(y, np.full_like(y, 0.5))) == pytest.approx(0.5)
    # empty prediction of an empty mask: (0 + 1) / (0 + 0 + 1) = 1 -> loss 0
    assert float(losses.dice_loss(np.zeros_like(y), np.zeros_like(y))) == pytest.approx(0.0)


def test_dice_pools_over_the_batch():
    # A: one lesion pixel predicted exactly. B: no lesion, two pixels predicted 1.
    # pooled: sum(py) = 1, sum(p) = 3, sum(y) = 1 -> 1 - 3 / 5 = 0.4
    # (the mean of per-image losses would be (0 + (1 - 1/3)) / 2 = 1/3)
    y = np.zeros((2, 2, 2), np.float32)
    p = np.zeros((2, 2, 2), np.float32)
    y[0, 0, 0] = p[0, 0, 0] = 1
    p[1, 0, :] = 1
    assert float(losses.dice_loss(y, p)) == pytest.approx(0.4)
    assert float(losses.bce_dice(y, p)) == pytest.approx(float(losses.bce(y, p)) + 0.4, rel=1e-6)


def test_mismatched_ranks_raise():
    with pytest.raises(ValueError, match="y_true and y_prob"):
        losses.dice_loss(np.zeros((1, 2, 2, 1)), np.zeros((2, 2)))


# ---------------------------------------------------------------------- get_loss


def test_get_loss_table():
    y = np.zeros((1, 2, 2, 1), np.float32)
    y[0, 0, 0] = 1
    p = np.full_like(y, 0.5)
    assert losses.get_loss("bce") is losses.bce
    assert losses.get_loss("dice") is losses.dice_loss
    assert losses.get_loss("bce+dice") is losses.bce_dice
    weighted = losses.get_loss("weighted-bce", gamma=2.0)
    # w = 3 / 2: L = (1.5 + 3) ln2 / 4
    assert float(weighted(y, p)) == pytest.approx(1.125 * LN2, rel=1e-6)
    assert weighted.__name__ == "weighted_bce"
    with pytest.raises(ValueError, match="bce, dice, bce\\+dice, weighted-bce"):
        losses.get_loss("focal")
    with pytest.raises(ValueError, match="gamma must be positive"):
        losses.get_loss("weighted-bce", gamma=-1)
    with pytest.raises(ValueError, match="takes no arguments"):
        losses.get_loss("dice", gamma=2)


def reference_bce_dice(y_true, y_prob):
    """Mean binary cross-entropy plus the smoothed Dice loss pooled over the batch, in NumPy."""
    y, p = y_true.astype(np.float64), np.clip(y_prob.astype(np.float64), 1e-7, 1 - 1e-7)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    dice = 1.0 - (2.0 * np.sum(y * y_prob) + 1.0) / (np.sum(y_prob) + np.sum(y) + 1.0)
    return float(bce + dice)


@pytest.mark.parametrize("name", ["weighted-bce", "bce+dice"])
def test_losses_train_a_keras_model(name):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses.get_loss(name))
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype(np.float32)
    y = (x > 0.8).astype(np.float32)
    assert 0 < y.sum() < y.size
    before = model.predict(x, verbose=0)
    reference = {"weighted-bce": lambda: reference_weighted_bce(y, before, 1.0),
                 "bce+dice": lambda: reference_bce_dice(y, before)}[name]()  # fmt: skip
    history = model.fit(x, y, epochs=5, batch_size=4, verbose=0)
    loss = history.history["loss"]
    # One batch an epoch: the first loss is that of the untrained model, computed by NumPy.
    assert loss[0] == pytest.approx(reference, rel=1e-5)
    # And its gradients train the model: five Adam steps lower it.
    assert loss[-1] < loss[0]


# --------------------------------------------------------------------------- DSM


def test_dsm_alpha():
    assert losses.dsm_alpha(0, 10) == 1.0
    assert losses.dsm_alpha(5, 10) == pytest.approx(0.75)
    assert losses.dsm_alpha(9, 10) == pytest.approx(0.19)
    assert losses.dsm_alpha(10, 10) == 0.0
    assert losses.dsm_alpha(0.5, 1) == pytest.approx(0.75)
    for epoch, epochs in [(-1, 10), (11, 10), (0, 0), (1, -2), (True, 3), (0, float("nan"))]:
        with pytest.raises(ValueError, match="epoch"):
            losses.dsm_alpha(epoch, epochs)


def test_dsm_loss_known_numbers():
    # 0.75 * 0.2 + 0.25 * 0.6 + 0.4 * (0.1 + 0.3) = 0.15 + 0.15 + 0.16 = 0.46
    assert losses.dsm_loss(0.75, 0.2, 0.6, 0.1, 0.3) == pytest.approx(0.46)
    # aux weight 0: 0.5 * 1 + 0.5 * 0 = 0.5
    assert losses.dsm_loss(0.5, 1.0, 0.0, 5.0, 5.0, aux_weight=0.0) == pytest.approx(0.5)
    tensors = [tf.constant(v) for v in (0.75, 0.2, 0.6, 0.1, 0.3)]
    assert float(losses.dsm_loss(*tensors)) == pytest.approx(0.46)


# ---------------------------------------------------------------- pixel sampler


def reference_rebalanced_counts(y_true, pos_fraction, rng):
    """NumPy re-balanced sampler: N1 lesion + (N - N1) background draws with replacement."""
    batch = y_true.shape[0]
    flat = y_true.reshape(batch, -1) > 0.5
    counts = np.zeros(flat.shape, np.float64)
    n = flat.shape[1]
    for i, lesion in enumerate(flat):
        pos, neg = np.flatnonzero(lesion), np.flatnonzero(~lesion)
        n1 = 0 if pos.size == 0 else n if neg.size == 0 else round(pos_fraction * n)
        np.add.at(counts[i], rng.choice(pos, n1) if n1 else [], 1)
        np.add.at(counts[i], rng.choice(neg, n - n1) if n - n1 else [], 1)
    return counts.reshape(y_true.shape)


def _mask(shape, lesion_pixels):
    y = np.zeros(shape, np.float32)
    for index in lesion_pixels:
        y[index] = 1
    return y


def test_sampler_counts_per_image_and_class():
    y = np.zeros((4, 5, 5, 1), np.float32)
    y[0, 1:3, 1:3] = 1  # 4 lesion pixels of 25
    y[2] = 1  # no background
    y[3, 0, 0] = 1  # a single lesion pixel
    # y[1] has no lesion
    counts = losses.sample_rebalanced_pixels(y, pos_fraction=0.5, seed=7).numpy()
    assert counts.shape == y.shape and counts.dtype == np.float32
    np.testing.assert_array_equal(counts.sum(axis=(1, 2, 3)), [25, 25, 25, 25])
    lesion_draws = (counts * y).sum(axis=(1, 2, 3))
    # round(0.5 * 25) = 12 (half to even, like Python's round); all-background; all-lesion
    np.testing.assert_array_equal(lesion_draws, [12, 0, 25, 12])
    # drawn with replacement: the single lesion pixel is drawn 12 times
    assert counts[3, 0, 0, 0] == 12
    assert counts.max() > 1
    assert np.all(counts == np.round(counts)) and counts.min() >= 0


def test_sampler_other_fraction_and_seed_forms():
    y = _mask((1, 6, 6), [(0, 1, 1), (0, 2, 2), (0, 3, 3)])
    counts = losses.sample_rebalanced_pixels(y, pos_fraction=0.25, seed=(3, 4)).numpy()
    assert (counts * y).sum() == round(0.25 * 36) == 9
    assert counts.sum() == 36
    same = losses.sample_rebalanced_pixels(y, 0.25, seed=tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(counts, same)
    other = losses.sample_rebalanced_pixels(y, 0.25, seed=(3, 5)).numpy()
    assert not np.array_equal(counts, other)
    generated = losses.sample_rebalanced_pixels(y, 0.25, seed=tf.random.Generator.from_seed(1))
    assert float(tf.reduce_sum(generated)) == 36
    assert float(tf.reduce_sum(losses.sample_rebalanced_pixels(y))) == 36  # unseeded
    with pytest.raises(ValueError, match="pos_fraction must be in"):
        losses.sample_rebalanced_pixels(y, pos_fraction=1.5)


def test_sampler_is_uniform_within_each_class_like_numpy_reference():
    # 4 lesion pixels of 64, N1 = 32: each lesion pixel expects 32 / 4 = 8 draws,
    # each background pixel 32 / 60. Averaged over 400 images per sampler.
    single = _mask((1, 8, 8, 1), [(0, 0, 0, 0), (0, 3, 4, 0), (0, 7, 7, 0), (0, 4, 4, 0)])
    y = np.repeat(single, 400, axis=0)
    expected = np.where(single[0] > 0, 8.0, 32.0 / 60.0)
    tf_mean = losses.sample_rebalanced_pixels(y, 0.5, seed=11).numpy().mean(axis=0)
    np_mean = reference_rebalanced_counts(y, 0.5, np.random.default_rng(11)).mean(axis=0)
    lesion = single[0] > 0
    # std of a lesion pixel's mean: sqrt(32 * 1/4 * 3/4 / 400) = 0.12; background 0.036
    for mean in (tf_mean, np_mean):
        np.testing.assert_allclose(mean[lesion], expected[lesion], atol=0.5)
        np.testing.assert_allclose(mean[~lesion], expected[~lesion], atol=0.16)
    np.testing.assert_allclose(tf_mean, np_mean, atol=0.7)
    assert tf_mean[~lesion].std() < 0.1  # no background pixel favoured


def test_sampler_runs_in_tf_function_and_tf_data():
    y = _mask((3, 6, 6, 1), [(0, 1, 1, 0), (2, 5, 5, 0)])
    compiled = tf.function(lambda t, s: losses.sample_rebalanced_pixels(t, 0.5, seed=s))
    counts = compiled(tf.constant(y), tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal((counts * y).sum(axis=(1, 2, 3)), [18, 0, 18])

    dataset = tf.data.Dataset.from_tensor_slices(y).batch(3)
    dataset = dataset.map(lambda t: (t, losses.sample_rebalanced_pixels(t, 0.5, seed=[5, 6])))
    for truth, sample in dataset:
        np.testing.assert_array_equal(tf.reduce_sum(sample, axis=[1, 2, 3]).numpy(), [36] * 3)
        np.testing.assert_array_equal(truth.numpy(), y)
    # shape unknown until run time
    spec = tf.TensorSpec([None, None, None, 1], tf.float32)
    dynamic = tf.function(
        lambda t: losses.sample_rebalanced_pixels(t, seed=3), input_signature=[spec]
    )
    assert float(tf.reduce_sum(dynamic(tf.constant(y)))) == 108


def test_sampled_dice_loss_hand_worked():
    # y = [1, 0, 0, 0], p = 0.5, counts = [2, 0, 1, 1]:
    # sum(c p y) = 1, sum(c p) = 2, sum(c y) = 2 -> 1 - (2 + 1) / (4 + 1) = 0.4
    y = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    p = np.full_like(y, 0.5)
    counts = np.array([[[2.0, 0.0], [1.0, 1.0]]], np.float32)
    assert float(losses.sampled_dice_loss(y, p, counts)) == pytest.approx(0.4)
    # counts of 1 everywhere is the plain Dice loss
    ones = np.ones_like(y)
    assert float(losses.sampled_dice_loss(y, p, ones)) == pytest.approx(
        float(losses.dice_loss(y, p))
    )
    # (B, H, W, 1) counts with (B, H, W) inputs
    assert float(losses.sampled_dice_loss(y, p, counts[..., None])) == pytest.approx(0.4)


def test_sampled_dice_on_empty_masks_is_finite():
    y = tf.zeros((2, 6, 6, 1))
    p = tf.Variable(tf.random.stateless_uniform((2, 6, 6, 1), seed=(1, 1)))
    counts = losses.sample_rebalanced_pixels(y, seed=2)
    with tf.GradientTape() as tape:
        loss = losses.sampled_dice_loss(y, p, counts)
    # no lesion: 1 - 1 / (sum(c p) + 1), with sum(c p) over 72 draws
    expected = 1 - 1 / (float(tf.reduce_sum(counts * p)) + 1)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert np.all(np.isfinite(tape.gradient(loss, p).numpy()))
