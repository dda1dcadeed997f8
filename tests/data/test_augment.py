"""rmib.data.augment: the colour and contrast jitter and the streams it must not move."""

import numpy as np
import pytest
import tensorflow as tf

from rmib.data import augment as augment_lib

pytestmark = pytest.mark.timeout(120)

MODES = ("none", "rot90", "free")


def _pair(size=24, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    mask = np.zeros((size, size, 1), np.float32)
    mask[3:9, 5:17] = 1
    return tf.constant(image), tf.constant(mask)


def _augment(mode, jitter, index=5, **kwargs):
    image, mask = _pair()
    seed = augment_lib.example_seed(3, 1, index)
    out = augment_lib.augment_pair(image, mask, seed, mode=mode, colour_jitter=jitter, **kwargs)
    return out[0].numpy(), out[1].numpy()


def test_no_jitter_is_the_identity_on_the_image():
    image, mask = _pair()
    seed = augment_lib.example_seed(3, 1, 5)
    out_image, out_mask = augment_lib.augment_pair(image, mask, seed, mode="none")
    np.testing.assert_array_equal(out_image.numpy(), image.numpy())
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy())
    # The arithmetic itself: no shift, contrast and saturation factors 1.
    same = augment_lib.adjust_colour(image, 0.0, 1.0, 1.0).numpy()
    np.testing.assert_allclose(same, image.numpy(), atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_the_mask_and_the_geometry_do_not_move_with_the_jitter(mode):
    _, reference = _augment(mode, 0.0)
    for jitter in (0.1, 0.5, 0.9):
        image, mask = _augment(mode, jitter)
        np.testing.assert_array_equal(mask, reference)
        assert mask.dtype == np.float32
    if mode == "none":
        np.testing.assert_array_equal(reference, _pair()[1].numpy())


@pytest.mark.parametrize("mode", ("rot90", "free"))
def test_the_jitter_changes_the_image_and_only_pointwise_in_rot90(mode):
    plain, _ = _augment(mode, 0.0, noise_std=0.0)
    jittered, _ = _augment(mode, 0.3, noise_std=0.0)
    assert np.abs(jittered - plain).max() > 1.0
    if mode == "rot90":
        # Flips and turns move pixels, the jitter only changes their values: the
        # jittered image is the plain one passed through adjust_colour.
        brightness, contrast, saturation = _draws(0.3)
        expected = _numpy_colour(plain, brightness, contrast, saturation)
        np.testing.assert_allclose(jittered, expected, atol=1e-2)


def test_the_same_seed_gives_the_same_output_and_another_seed_another():
    for mode in MODES:
        first = _augment(mode, 0.3)
        again = _augment(mode, 0.3)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
    other = _augment("none", 0.3, index=6)
    assert not np.array_equal(other[0], _augment("none", 0.3)[0])


def test_the_flips_and_turns_are_the_streams_they_were():
    # seeds[0] flips left-right, seeds[1] up-down, seeds[2] picks the quarter
    # turns: the draws of the stream as it was before the jitter, replayed in NumPy.
    image, mask = _pair()
    seen = set()
    for index in range(8):
        seed = augment_lib.example_seed(3, 1, index)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
        flip_lr = tf.random.stateless_uniform([], seeds[0]).numpy() < 0.5
        flip_ud = tf.random.stateless_uniform([], seeds[1]).numpy() < 0.5
        k = int(tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32))
        expected = mask.numpy()
        expected = expected[:, ::-1] if flip_lr else expected
        expected = expected[::-1] if flip_ud else expected
        expected = np.rot90(expected, k, axes=(0, 1))
        for jitter in (0.0, 0.2):
            out = augment_lib.augment_pair(image, mask, seed, mode="rot90", colour_jitter=jitter)
            np.testing.assert_array_equal(out[1].numpy(), expected)
        seen.add((bool(flip_lr), bool(flip_ud), k))
    assert len(seen) > 2


def test_the_output_stays_in_range():
    image = np.zeros((16, 16, 3), np.float32)
    image[:8] = 255.0
    image[8:, :, 0] = 250.0
    mask = tf.zeros((16, 16, 1))
    for index in range(12):
        seed = augment_lib.example_seed(0, 0, index)
        out = augment_lib.augment_pair(
            tf.constant(image), mask, seed, mode="free", colour_jitter=0.9
        )[0].numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0


def test_contrast_and_brightness_by_hand():
    # Grey pixels 100 and 200 (R = G = B, so saturation has no effect): mean 150;
    # contrast 2 -> 50 and 250; brightness +10 -> 60 and 260, clipped to 255.
    image = tf.constant([[[100.0] * 3, [200.0] * 3]])
    out = augment_lib.adjust_colour(image, 10.0, 2.0, 1.7).numpy()
    np.testing.assert_allclose(out, [[[60.0] * 3, [255.0] * 3]], atol=1e-4)
    # Contrast 0.5 about each channel's own mean, brightness -20: red 100, 200
    # (mean 150) -> 105, 155; green 40, 60 (mean 50) -> 25, 35.
    image = tf.constant([[[100.0, 40.0, 0.0], [200.0, 60.0, 0.0]]])
    out = augment_lib.adjust_colour(image, -20.0, 0.5, 1.0).numpy()
    np.testing.assert_allclose(out[..., :2], [[[105.0, 25.0], [155.0, 35.0]]], atol=1e-4)
    np.testing.assert_array_equal(out[..., 2], 0.0)  # -20 clipped


def _numpy_colour(image, brightness, contrast, saturation):
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = (image - mean) * contrast + mean + brightness
    grey = image @ np.array([0.299, 0.587, 0.114])
    image = grey[..., None] + (image - grey[..., None]) * saturation
    return np.clip(image, 0, 255)


def test_adjust_colour_matches_numpy():
    image = np.random.default_rng(2).uniform(0, 255, (9, 7, 3)).astype(np.float32)
    for factors in ((12.0, 1.3, 0.6), (-30.0, 0.8, 1.4), (0.0, 1.0, 0.0)):
        out = augment_lib.adjust_colour(tf.constant(image), *factors).numpy()
        np.testing.assert_allclose(out, _numpy_colour(image, *factors), atol=1e-3)
    # Saturation 0 leaves every pixel grey.
    grey = augment_lib.adjust_colour(tf.constant(image), 0.0, 1.0, 0.0).numpy()
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-3)


def _draws(strength, index=5):
    seed = augment_lib.example_seed(3, 1, index)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    jitter_seeds = tf.random.experimental.stateless_split(seeds[5], num=3)
    return (
        float(tf.random.stateless_uniform([], jitter_seeds[0], -strength * 255, strength * 255)),
        float(tf.random.stateless_uniform([], jitter_seeds[1], 1 - strength, 1 + strength)),
        float(tf.random.stateless_uniform([], jitter_seeds[2], 1 - strength, 1 + strength)),
    )


def test_the_draws_cover_their_ranges(monkeypatch):
    seen = []

    def record(image, brightness, contrast, saturation):
        seen.append((float(brightness), float(contrast), float(saturation)))
        return image

    monkeypatch.setattr(augment_lib, "adjust_colour", record)
    image, mask = _pair(8)
    for index in range(40):
        seed = augment_lib.example_seed(0, 0, index)
        augment_lib.augment_pair(image, mask, seed, mode="none", colour_jitter=0.2)
    draws = np.array(seen)
    assert len(draws) == 40
    assert np.all(np.abs(draws[:, 0]) <= 0.2 * 255) and np.ptp(draws[:, 0]) > 0.2 * 255
    for column in (1, 2):
        assert np.all(np.abs(draws[:, column] - 1) <= 0.2) and np.ptp(draws[:, column]) > 0.2
    # Brightness, contrast and saturation are independent draws.
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.5


@pytest.mark.parametrize("strength", (-0.1, 1.0, 1.5))
def test_a_bad_strength_is_refused(strength):
    image, mask = _pair(8)
    seed = augment_lib.example_seed(0, 0, 0)
    with pytest.raises(ValueError, match=rf"colour_jitter must be in \[0, 1\), got {strength}"):
        augment_lib.augment_pair(image, mask, seed, colour_jitter=strength)


def test_the_jitter_needs_an_rgb_image():
    image = tf.zeros((8, 8, 1))
    seed = augment_lib.example_seed(0, 0, 0)
    with pytest.raises(ValueError, match="RGB image"):
        augment_lib.augment_pair(image, image, seed, mode="none", colour_jitter=0.1)
