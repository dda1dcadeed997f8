"""Dual2Net's training loss: the dual-sampling modulated Dice of both branches plus the auxiliary heads,
and the schedule of its alpha."""

from __future__ import annotations

import keras
from keras import ops

from rmib import losses as losses_lib

AUX_WEIGHT = 0.4  # PSPNet's auxiliary loss weight, which the paper adopts


def dual2net_loss(
    alpha,
    y_large,
    p_large,
    aux_large,
    y_small,
    p_small,
    aux_small,
    counts_small,
    aux_weight: float = AUX_WEIGHT,
):
    """The Dual2Net training loss and its four terms.

        L = alpha * Dice(y_large, p_large) + (1 - alpha) * SampledDice(y_small, p_small)
            + aux_weight * (Dice(y_large, aux_large) + Dice(y_small, aux_small))

    Dice is `rmib.losses.dice_loss` (pooled over the batch); SampledDice is
    `rmib.losses.sampled_dice_loss` over the re-balanced pixel sample `counts_small`,
    used by the small branch's final classifier only: both auxiliary heads take the
    plain Dice on the full label (the paper's eqs. 7 and 8, and the authors' code), so
    the shared trunk gets no lesion-oversampled gradient outside the alpha schedule.

    Returns:
        (total, {"dice_large", "dice_small", "aux_large", "aux_small"}), float32 scalars.
    """
    terms = {
        "dice_large": losses_lib.dice_loss(y_large, p_large),
        "dice_small": losses_lib.sampled_dice_loss(y_small, p_small, counts_small),
        "aux_large": losses_lib.dice_loss(y_large, aux_large),
        "aux_small": losses_lib.dice_loss(y_small, aux_small),
    }
    alpha = ops.cast(alpha, "float32")
    total = losses_lib.dsm_loss(
        alpha,
        terms["dice_large"],
        terms["dice_small"],
        terms["aux_large"],
        terms["aux_small"],
        aux_weight=aux_weight,
    )
    return total, terms


def _single_loss(variant):
    if variant == "dice":
        return losses_lib.dice_loss
    return lambda y_true, y_prob: losses_lib.weighted_bce(y_true, y_prob, gamma=1.0)


class DSMAlphaSchedule(keras.callbacks.Callback):
    """Sets the model's `dsm_alpha` to 1 - (epoch / epochs)^2 at the start of every epoch.

    The epoch is Keras' zero-based epoch index, so a resumed run continues
    the schedule where it stopped. The value is logged as "dsm_alpha" by
    `Dual2Net.train_step`.

    Args:
        epochs: the run's total number of epochs.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        alpha = getattr(self.model, "dsm_alpha", None)
        if alpha is not None:
            alpha.assign(losses_lib.dsm_alpha(min(epoch, self.epochs), self.epochs))
