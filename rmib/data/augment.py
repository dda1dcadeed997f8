"""Joint image/mask augmentation, stateless and seeded per (seed, epoch, example).

Every random draw comes from `tf.random.stateless_*` with a seed derived from
the run's seed, the epoch and the example's index, so an epoch's augmentation
is the same whether the run was interrupted or not (the crash-safe resume of
a `--deterministic` run depends on it), and the image and its mask always
receive the same transformation. The optional colour and contrast jitter
(`colour_jitter`, a recipe key) changes the image alone.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from rmib.choices import AUGMENT_MODES


def _validate_mode(mode):
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")


def rotation_zoom_transform(angle, zoom, height, width):
    """The 8-parameter projective transform (output -> input coordinates) that
    rotates by `angle` radians and zooms by `zoom` (>1 enlarges) about the centre."""
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cos = tf.cos(angle) / zoom
    sin = tf.sin(angle) / zoom
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    zero = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])


def validate_colour_jitter(strength) -> None:
    """Raise ValueError unless `strength` is a colour-jitter strength in [0, 1)."""
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"colour_jitter must be in [0, 1), got {strength!r}")


# Luma weights of ITU-R BT.601 (as tf.image.rgb_to_grayscale): the grey that
# saturation is blended against.
_LUMA = (0.299, 0.587, 0.114)


def adjust_colour(image, brightness, contrast, saturation):
    """Brightness, contrast and saturation of an RGB image with given factors.

    Args:
        image: (H, W, 3) float32 in [0, 255].
        brightness: added to every pixel (in units of [0, 255]).
        contrast: each channel's distance to its mean over the image is
            multiplied by it (as `tf.image.adjust_contrast`).
        saturation: each pixel's distance to its grey (BT.601 luma) is
            multiplied by it (0 = grey, 1 = unchanged).

    Returns:
        The image, clipped to [0, 255].
    """
    mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
    image = (image - mean) * contrast + mean + brightness
    grey = tf.reduce_sum(image * tf.constant(_LUMA, image.dtype), axis=-1, keepdims=True)
    image = grey + (image - grey) * saturation
    return tf.clip_by_value(image, 0.0, 255.0)


def jitter_colour(image, seed, strength):
    """`adjust_colour` with factors drawn from `seed` for jitter `strength` s:
    brightness uniform in [-s, s] x 255, contrast and saturation in [1 - s, 1 + s]."""
    validate_colour_jitter(strength)
    if image.shape[-1] != 3:
        raise ValueError(f"colour jitter needs an RGB image (3 channels), got shape {image.shape}")
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    brightness = tf.random.stateless_uniform([], seeds[0], -strength * 255.0, strength * 255.0)
    contrast = tf.random.stateless_uniform([], seeds[1], 1.0 - strength, 1.0 + strength)
    saturation = tf.random.stateless_uniform([], seeds[2], 1.0 - strength, 1.0 + strength)
    return adjust_colour(image, brightness, contrast, saturation)


def augment_pair(
    image,
    mask,
    seed,
    mode="free",
    max_rotation=180.0,
    zoom_range=0.1,
    noise_std=4.0,
    colour_jitter=0.0,
):
    """Augment one image and its mask(s) identically.

    Args:
        image: (H, W, C) float32 in [0, 255].
        mask: (H, W, K) float32 of 0/1 (any number of channels, e.g. lesion + FOV).
        seed: int32/int64 tensor of shape (2,), the stateless seed of this example.
        mode: "none"; "free" = rotation by any angle in +-max_rotation degrees,
            zoom in [1 - zoom_range, 1 + zoom_range], horizontal/vertical flips
            and Gaussian noise of std `noise_std` on the image; "rot90" =
            multiples of 90 degrees only (square inputs; 0/180 on non-square
            ones so shapes stay fixed) and flips; "flip-rot90" is an alias.
        colour_jitter: strength s in [0, 1) of a colour and contrast jitter of
            the image alone (C = 3), after the geometric part and in any mode
            (`jitter_colour`): brightness +-s x 255, contrast and saturation
            factors in [1 - s, 1 + s], clipped to [0, 255]. 0 (default) = off;
            its draws come from a seed of their own, so turning it on leaves
            the geometric transformation of every seed as it was.

    Returns:
        (image, mask) with the same shapes; the mask stays binary.
    """
    _validate_mode(mode)
    validate_colour_jitter(colour_jitter)
    if mode == "none" and colour_jitter == 0:
        return image, mask
    # seeds[0..4] are the geometric streams; seeds[5] the colour jitter's.
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    if mode in ("rot90", "flip-rot90"):
        image, mask = _flip_rot90(image, mask, seeds)
    elif mode == "free":
        image, mask = _flip_rotate_zoom(image, mask, seeds, max_rotation, zoom_range, noise_std)
    if colour_jitter > 0:
        image = jitter_colour(image, seeds[5], colour_jitter)
    return image, mask


def _flips(image, mask, seeds):
    flip_lr = tf.random.stateless_uniform([], seeds[0]) < 0.5
    flip_ud = tf.random.stateless_uniform([], seeds[1]) < 0.5
    stack = tf.concat([image, mask], axis=-1)
    stack = tf.cond(flip_lr, lambda: tf.reverse(stack, [1]), lambda: stack)
    return tf.cond(flip_ud, lambda: tf.reverse(stack, [0]), lambda: stack)


def _flip_rot90(image, mask, seeds):
    stack = _flips(image, mask, seeds)
    channels = image.shape[-1]
    shape = tf.shape(stack)
    square = tf.equal(shape[0], shape[1])
    k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
    # Odd quarter turns would change a non-square image's shape; use a half turn.
    k = tf.where(square, k, 2 * (k % 2))
    stack = tf.image.rot90(stack, k)
    stack = tf.ensure_shape(stack, image.shape[:2].concatenate([None]))
    return stack[..., :channels], stack[..., channels:]


def _flip_rotate_zoom(image, mask, seeds, max_rotation, zoom_range, noise_std):
    stack = _flips(image, mask, seeds)
    channels = image.shape[-1]
    angle = tf.random.stateless_uniform(
        [], seeds[2], -max_rotation * math.pi / 180.0, max_rotation * math.pi / 180.0
    )
    zoom = tf.random.stateless_uniform([], seeds[3], 1.0 - zoom_range, 1.0 + zoom_range)
    shape = tf.shape(stack)
    transform = rotation_zoom_transform(angle, zoom, shape[0], shape[1])
    image = keras.ops.image.affine_transform(
        stack[None, ..., :channels], transform[None], interpolation="bilinear", fill_mode="constant"
    )[0]
    mask = keras.ops.image.affine_transform(
        stack[None, ..., channels:], transform[None], interpolation="nearest", fill_mode="constant"
    )[0]
    if noise_std > 0:
        image = image + tf.random.stateless_normal(tf.shape(image), seeds[4], stddev=noise_std)
        image = tf.clip_by_value(image, 0.0, 255.0)
    return image, tf.round(mask)


def example_seed(seed, epoch, index):
    """The stateless seed of one example in one epoch."""
    return tf.stack(
        [tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), tf.cast(index, tf.int64)]
    )
