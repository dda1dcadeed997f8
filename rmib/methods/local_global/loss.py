"""The local-global U-Net's loss: weighted BCE of the fused and global outputs plus L2 on the kernels."""

from __future__ import annotations

import keras

from rmib.losses import weighted_bce


@keras.saving.register_keras_serializable(package="rmib")
class WeightedBCE(keras.losses.Loss):
    """Eq. 2 of Yan et al. (ISBI 2019) as a Keras loss: `rmib.losses.weighted_bce`.

    Args:
        gamma: scale of the positive weight |Y-| / (gamma * |Y+|).
        name: the loss's name.
        **kwargs: other `keras.losses.Loss` arguments.
    """

    def __init__(self, gamma: float = 1.0, name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        return weighted_bce(y_true, y_pred, gamma=self.gamma)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


def l2_penalty(kernels):
    """phi(theta) of eq. 1: the squared L2 norm (sum of squares) of the kernels, float32."""
    return sum(
        (keras.ops.sum(keras.ops.square(keras.ops.cast(k, "float32"))) for k in kernels),
        keras.ops.convert_to_tensor(0.0, "float32"),
    )


def combined_loss(
    y_global, p_global, y_local, p_local, kernels, lambdas=(1.0, 1.0, 1e-4), gamma=1.0
):
    """Eq. 1 of Yan et al.: l1 * L_global + l2 * L_local + l3 * phi(theta).

    What the fused model's compiled loss computes (the weighted output losses
    plus the kernels' L2 regularisers); written out for tests and reports.

    Args:
        y_global, p_global: GlobalNet targets and probabilities (B, G, G[, 1]).
        y_local, p_local: patch targets and fused probabilities (B, p, p[, 1]).
        kernels: the convolution kernels phi sums over.
        lambdas: (l1, l2, l3).
        gamma: gamma of eq. 2.

    Returns:
        Scalar float32 tensor.
    """
    l1, l2, l3 = lambdas
    return (
        l1 * weighted_bce(y_global, p_global, gamma)
        + l2 * weighted_bce(y_local, p_local, gamma)
        + l3 * l2_penalty(kernels)
    )


def kernels_of(model) -> list:
    """The convolution kernels of a model (every weight named "kernel")."""
    return [w for w in model.weights if w.path.rsplit("/", 1)[-1] == "kernel"]
