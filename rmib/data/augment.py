"""Joint image/mask augmentation, stateless and seeded per (seed, epoch, example).

Every random draw comes from `tf.random.stateless_*` with a seed derived from
the run's seed, the epoch and the example's index, so an epoch's augmentation
is the same whether the run was interrupted or not (the crash-safe resume of
a `--deterministic` run depends on it), and the image and its mask always
receive the same transformation.
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


def augment_pair(image, mask, seed, mode="free", max_rotation=180.0, zoom_range=0.1, noise_std=4.0):
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

    Returns:
        (image, mask) with the same shapes; the mask stays binary.
    """
    _validate_mode(mode)
    if mode == "none":
        return image, mask
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    flip_lr = tf.random.stateless_uniform([], seeds[0]) < 0.5
    flip_ud = tf.random.stateless_uniform([], seeds[1]) < 0.5
    stack = tf.concat([image, mask], axis=-1)
    stack = tf.cond(flip_lr, lambda: tf.reverse(stack, [1]), lambda: stack)
    stack = tf.cond(flip_ud, lambda: tf.reverse(stack, [0]), lambda: stack)
    channels = image.shape[-1]
    if mode in ("rot90", "flip-rot90"):
        shape = tf.shape(stack)
        square = tf.equal(shape[0], shape[1])
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        # Odd quarter turns would change a non-square image's shape; use a half turn.
        k = tf.where(square, k, 2 * (k % 2))
        stack = tf.image.rot90(stack, k)
        stack = tf.ensure_shape(stack, image.shape[:2].concatenate([None]))
        image, mask = stack[..., :channels], stack[..., channels:]
        return image, mask
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
