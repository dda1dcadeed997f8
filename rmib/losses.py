"""Segmentation losses: weighted cross-entropy, Dice, and the DSM Dice loss.

Every loss takes ``y_true`` and ``y_prob`` (probabilities, not logits) shaped
(B, H, W, 1) or (B, H, W), computes in float32 whatever the model's precision,
and returns a scalar.

- `weighted_bce`: eq. 2 of Yan et al., "Learning Mutually Local-Global U-Nets
  for High-Resolution Retinal Lesion Segmentation in Fundus Images" (ISBI 2019),
  with the positive weight the text states, |Y-| / (gamma * |Y+|).
- `dice_loss`, `sampled_dice_loss`, `sample_rebalanced_pixels`, `dsm_alpha`,
  `dsm_loss`: the dual-sampling modulated (DSM) Dice loss of Dual2Net, with
  Dice pooled over the pixels of the batch as in its authors' code and
  smoothed as DESIGN.md fixes, 1 - (2 I + 1) / (sum p + sum y + 1); the
  authors' `CriterionDice` smooths differently (see `dice_loss`).
"""

from __future__ import annotations

import math
import numbers

import tensorflow as tf
from keras import ops

EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before a log
SMOOTH = 1.0  # the Dice "+1" in numerator and denominator (DESIGN.md's form)


def _as_pair(y_true, y_prob):
    """Cast to float32 and drop a trailing channel axis of 1 so both have the same shape."""
    y_true = ops.cast(y_true, "float32")
    y_prob = ops.cast(y_prob, "float32")
    if len(y_true.shape) == 4 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    if len(y_prob.shape) == 4 and y_prob.shape[-1] == 1:
        y_prob = ops.squeeze(y_prob, axis=-1)
    if len(y_true.shape) != len(y_prob.shape):
        raise ValueError(
            f"y_true and y_prob must both be (B, H, W) or (B, H, W, 1), "
            f"got {tuple(y_true.shape)} and {tuple(y_prob.shape)}"
        )
    return y_true, y_prob


def _image_axes(x) -> tuple[int, ...]:
    return tuple(range(1, len(x.shape)))


def weighted_bce(y_true, y_prob, gamma: float = 1.0):
    """Class-weighted binary cross-entropy of Yan et al. (ISBI 2019), eq. 2.

    For each image, with Y+ / Y- its lesion / background pixels and N = |Y+| + |Y-|:

        L_i = -(w * sum_{Y+} log p + sum_{Y-} log(1 - p)) / N,  w = |Y-| / (gamma * |Y+|)

    (the printed eq. 2 writes |Y-| / (|Y+| + gamma); rmib follows the text's
    definition of the weight). The loss is the mean of L_i over the batch. An
    image without lesion pixels contributes its background term only.

    Args:
        y_true: ground truth in {0, 1}, (B, H, W, 1) or (B, H, W).
        y_prob: predicted lesion probabilities, same shape.
        gamma: scale of the positive weight (larger = less weight on lesions).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: gamma not positive, or mismatched shapes.
    """
    if isinstance(gamma, numbers.Real) and not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    y_true, y_prob = _as_pair(y_true, y_prob)
    axes = _image_axes(y_true)
    p = ops.clip(y_prob, EPSILON, 1.0 - EPSILON)
    pixels = ops.sum(ops.ones_like(y_true), axis=axes)
    positives = ops.sum(y_true, axis=axes)
    negatives = pixels - positives
    # No lesion: the weight multiplies a zero sum; keep it finite so 0 * w = 0.
    weight = ops.where(positives > 0, negatives / (gamma * ops.maximum(positives, EPSILON)), 0.0)
    log_pos = ops.sum(y_true * ops.log(p), axis=axes)
    log_neg = ops.sum((1.0 - y_true) * ops.log(1.0 - p), axis=axes)
    per_image = -(weight * log_pos + log_neg) / pixels
    return ops.mean(per_image)


def bce(y_true, y_prob):
    """Mean binary cross-entropy over all pixels of the batch (float32, clipped)."""
    y_true, y_prob = _as_pair(y_true, y_prob)
    p = ops.clip(y_prob, EPSILON, 1.0 - EPSILON)
    return -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))


def dice_loss(y_true, y_prob):
    """Smoothed Dice loss pooled over every pixel of the batch (as Dual2Net's code pools).

        L = 1 - (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1)

    Returns 0 for an empty prediction of an empty mask. The Dual2Net authors'
    `CriterionDice` smooths the intersection before doubling it,
    1 - 2 * (sum(p * y) + 1) / (sum(y) + sum(p) + 1), so its numerator carries 2
    where this one carries 1: it gives -1 for an empty prediction of an empty mask
    and differs from this form by 1 / (sum(p) + sum(y) + 1), negligible on a
    photograph with lesions, large on a lesion-free batch. rmib keeps DESIGN.md's
    form (a loss in [0, 1), 0 for an empty prediction of an empty mask).
    """
    y_true, y_prob = _as_pair(y_true, y_prob)
    intersection = ops.sum(y_prob * y_true)
    return 1.0 - (2.0 * intersection + SMOOTH) / (ops.sum(y_prob) + ops.sum(y_true) + SMOOTH)


def bce_dice(y_true, y_prob):
    """`bce` + `dice_loss`."""
    return bce(y_true, y_prob) + dice_loss(y_true, y_prob)


def sampled_dice_loss(y_true, y_prob, counts):
    """Dice loss over a pixel sample drawn with replacement, pooled over the batch.

    Each pixel enters the sums as many times as it was drawn:

        L = 1 - (2 * sum(c * p * y) + 1) / (sum(c * p) + sum(c * y) + 1)

    Smoothed as `dice_loss` (DESIGN.md's form, not the authors' `CriterionDice`,
    whose numerator is 2 * (intersection + 1); see `dice_loss`).

    Args:
        y_true: ground truth, (B, H, W, 1) or (B, H, W).
        y_prob: predicted probabilities, same shape.
        counts: times each pixel was drawn, same shape (`sample_rebalanced_pixels`).
    """
    y_true, y_prob = _as_pair(y_true, y_prob)
    counts, _ = _as_pair(counts, y_prob)
    intersection = ops.sum(counts * y_prob * y_true)
    total = ops.sum(counts * y_prob) + ops.sum(counts * y_true)
    return 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)


def _seed_tensor(seed):
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    if isinstance(seed, tf.random.Generator):
        return seed.make_seeds(1)[:, 0]
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return tf.constant([int(seed), 0], dtype=tf.int64)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or (seed.shape[0] is not None and seed.shape[0] != 2):
        raise ValueError(f"seed must be an int or a pair of ints, got shape {seed.shape}")
    return seed


def sample_rebalanced_pixels(y_true, pos_fraction: float = 0.5, seed=None):
    """Dual2Net's re-balanced pixel sampler, as per-pixel draw counts (TensorFlow ops).

    For each image with N = H * W pixels it draws, with replacement and
    uniformly within each set, N1 = round(pos_fraction * N) lesion pixels and
    N - N1 background pixels. An image without lesion pixels draws all N from
    the background, one without background all N from the lesion. Runs eagerly,
    inside ``tf.function`` and in a ``tf.data`` map.

    Args:
        y_true: ground truth (B, H, W, 1) or (B, H, W); a pixel is lesion when > 0.5.
        pos_fraction: N1 / N, in [0, 1] (0.5 in the paper).
        seed: an int, a pair of ints or an int tensor of shape (2,) (stateless,
            reproducible), a ``tf.random.Generator``, or None (fresh draws).

    Returns:
        float32 tensor shaped like ``y_true``: how many times each pixel was
        drawn; each image's counts sum to N. Feed it to `sampled_dice_loss`.

    Raises:
        ValueError: pos_fraction outside [0, 1] or a malformed seed.
    """
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    y_true = tf.convert_to_tensor(y_true)
    shape = tf.shape(y_true)
    batch = shape[0]
    lesion = tf.reshape(tf.cast(y_true, tf.float32) > 0.5, [batch, -1])
    pixels = tf.shape(lesion, out_type=tf.int64)[1]
    batch = tf.cast(batch, tf.int64)
    cum_pos = tf.cumsum(tf.cast(lesion, tf.int64), axis=1)
    n_pos = cum_pos[:, -1]
    n_neg = pixels - n_pos
    n1 = tf.cast(tf.round(pos_fraction * tf.cast(pixels, tf.float64)), tf.int64)
    from_lesion = tf.where(n_pos == 0, tf.zeros_like(n_pos), tf.where(n_neg == 0, pixels, n1))

    # List each image's pixels lesion first, then background (a scatter, O(N)):
    # the lesion set is then ranks [0, n_pos) and the background [n_pos, N).
    position = tf.range(pixels, dtype=tf.int64)[None, :]
    row_start = tf.range(batch, dtype=tf.int64)[:, None] * pixels
    rank = tf.where(lesion, cum_pos - 1, n_pos[:, None] + position - cum_pos)
    order = tf.scatter_nd(
        tf.reshape(rank + row_start, [-1, 1]),
        tf.reshape(position + tf.zeros_like(row_start), [-1]),
        [batch * pixels],
    )
    # Draw j of an image comes from the lesion set when j < from_lesion, else from
    # the background. Full-range int64 draws modulo the set size give a uniform
    # rank (float draws would favour some ranks when N is ~10^6).
    draws = tf.random.stateless_uniform(
        tf.stack([batch, pixels]), _seed_tensor(seed), dtype=tf.int64, minval=None, maxval=None
    )
    drawn_rank = tf.where(
        position < from_lesion[:, None],
        tf.math.floormod(draws, tf.maximum(n_pos, 1)[:, None]),
        n_pos[:, None] + tf.math.floormod(draws, tf.maximum(n_neg, 1)[:, None]),
    )
    index = tf.gather(order, tf.reshape(drawn_rank + row_start, [-1]))
    flat = index + tf.reshape(row_start + tf.zeros_like(position), [-1])
    counts = tf.math.bincount(
        flat, minlength=batch * pixels, maxlength=batch * pixels, dtype=tf.float32
    )
    return tf.reshape(counts, shape)


def dsm_alpha(epoch, epochs) -> float:
    """Weight of the large-lesion (uniform) branch in the DSM loss: 1 - (epoch / epochs)^2.

    ``epoch`` is zero-based, so training starts at alpha = 1 (large lesions
    first) and alpha falls towards 0. ``epoch == epochs`` (after the last
    epoch) gives 0; a fractional epoch is allowed for per-step schedules.

    Raises:
        ValueError: epochs not a positive number, or epoch outside [0, epochs].
    """
    for name, value in (("epoch", epoch), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not 0 <= epoch <= epochs:
        raise ValueError(f"epoch must be in [0, epochs={epochs}] (zero-based), got {epoch}")
    return 1.0 - (float(epoch) / float(epochs)) ** 2


def dsm_loss(alpha, dice_large, dice_small, aux_large, aux_small, aux_weight: float = 0.4):
    """Total Dual2Net loss: alpha * L_large + (1 - alpha) * L_small + aux_weight * (aux sum).

    The printed eq. 5 swaps the weights; its text and its authors' code weight
    the uniform-sampler (large-lesion) branch by alpha, as here. 0.4 is the
    auxiliary weight of PSPNet, which the paper adopts.
    """
    return alpha * dice_large + (1.0 - alpha) * dice_small + aux_weight * (aux_large + aux_small)


def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _make_weighted_bce(gamma: float = 1.0):
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return _named(lambda y_true, y_prob: weighted_bce(y_true, y_prob, gamma=gamma), "weighted_bce")


LOSSES = {
    "bce": lambda: bce,
    "dice": lambda: dice_loss,
    "bce+dice": lambda: bce_dice,
    "weighted-bce": _make_weighted_bce,
}


def get_loss(name: str, **kwargs):
    """The loss function called `name`: "bce", "dice", "bce+dice" or "weighted-bce".

    Keyword arguments go to the loss (``gamma`` for "weighted-bce").

    Raises:
        ValueError: an unknown name (listing the valid ones) or unexpected kwargs.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError:
        raise ValueError(f"loss {name!r} takes no arguments {sorted(kwargs)}") from None


__all__ = [
    "bce",
    "bce_dice",
    "dice_loss",
    "dsm_alpha",
    "dsm_loss",
    "get_loss",
    "sample_rebalanced_pixels",
    "sampled_dice_loss",
    "weighted_bce",
]
