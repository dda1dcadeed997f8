"""The precision a trained model predicts in, and how closely two runs of it must agree.

A model trained under ``mixed_bfloat16`` or ``mixed_float16`` keeps float32
variables; only its compute dtype is reduced. So one trained model can predict
in any precision: `with_precision` switches the compute dtype of its layers in
place (no weight changes), keeping float32 in the layers that must stay float32
whatever the policy: the layers that produce the model's outputs (the sigmoid
or softmax heads, so that probabilities, losses and metrics are float32) and
the layers that pin float32 themselves (`rmib.models.layers` input
normalisation).

Prediction and export default to float32 (`PREDICT_DEFAULT`): on a bfloat16
CPU a VGG16-CBAM encoder-decoder trained with ``auto`` scored AP 0.285 on a
real IDRiD crop predicted in float32 and 0.213 in mixed_bfloat16 (issue 15),
and a float32 SavedModel serves on every CPU, GPU and TFLite runtime.
``--precision auto`` predicts in the machine's fast precision instead.

`check_tolerance` is the largest difference `rmib export --check` accepts
between an export and rmib's own prediction computed in the same precision.
"""

from __future__ import annotations

import keras

from rmib.choices import PREDICT_PRECISIONS
from rmib.errors import RmibError

MIXED = ("mixed_bfloat16", "mixed_float16")
# Bits of significand, the implicit leading bit included: unit roundoff 2**-bits.
SIGNIFICAND_BITS = {"float32": 24, "mixed_float16": 11, "mixed_bfloat16": 8}
# The float32 tolerance rmib has always used: float32 rounding differences
# (2**-24 relative) summed over thousands of terms stay far below it.
FLOAT32_TOLERANCE = 1e-4
PREDICT_DEFAULT = "float32"


def check_tolerance(precision: str) -> float:
    """Largest max-abs difference in probability accepted between two runs in `precision`.

    rmib's probabilities are ``sigmoid(z)`` (or a softmax) computed in float32
    from a logit ``z`` that the reduced-precision layers compute. Two runtimes
    executing the same graph may fuse operations differently, so a rounding
    may differ between them; if one rounding of the logit differs, ``z`` moves
    by at most ``u * |z|`` with ``u = 2**-bits`` the unit roundoff, and the
    probability by at most ``|dz| / 4`` (the sigmoid's largest slope). rmib's
    logits stay within +-8 where a probability is not already saturated
    (0.0003 .. 0.9997), so one differing rounding moves a probability by at most
    ``8 * u / 4 = 2 * u``: 2**-7 = 0.0078 for bfloat16 (8 bits), 2**-10 = 0.00098
    for float16 (11 bits). float32 keeps `FLOAT32_TOLERANCE` (1e-4), which is
    larger than ``2 * 2**-24``: the whole-image signatures also blend windows,
    and the reference does that in NumPy.

    Raises:
        RmibError: an unknown precision.
    """
    if precision not in SIGNIFICAND_BITS:
        raise RmibError(
            f"unknown precision {precision!r}; expected one of {', '.join(SIGNIFICAND_BITS)}"
        )
    return max(FLOAT32_TOLERANCE, 2.0 * 2.0 ** -SIGNIFICAND_BITS[precision])


def _all_layers(model) -> list:
    """The model and every layer in it, nested models and sublayers included, once each."""
    seen, layers = set(), []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return layers


def model_precision(model) -> str:
    """The policy a model computes in: the mixed policy of any of its layers, else float32."""
    names = {layer.dtype_policy.name for layer in _all_layers(model)}
    for name in MIXED:
        if name in names:
            return name
    return "float32"


def _pinned(model) -> set:
    """ids of the layers that stay float32 under a mixed policy: those producing outputs."""
    pinned = set()
    for tensor in keras.tree.flatten(getattr(model, "outputs", None) or []):
        history = getattr(tensor, "_keras_history", None)
        if history is not None:
            pinned.add(id(history.operation))
    return pinned


def with_precision(model, precision: str):
    """`model` computing in `precision` ("float32", "mixed_bfloat16" or "mixed_float16").

    Changes the dtype policy of its layers in place and returns it. Variables
    are float32 under every policy, so no weight changes. To float32, every
    layer computes in float32. To a mixed policy, the layers that computed in
    the model's own mixed policy (or, for a float32 model, every layer) switch,
    except those producing the model's outputs and those that pin float32
    themselves (`rmib.models.layers.ImageNetNormalization`).

    Raises:
        RmibError: an unknown precision.
    """
    if precision not in SIGNIFICAND_BITS:
        raise RmibError(
            f"unknown precision {precision!r}; expected one of {', '.join(SIGNIFICAND_BITS)}"
        )
    current = model_precision(model)
    if precision == current:
        return model
    pinned = set() if precision == "float32" else _pinned(model)
    for layer in _all_layers(model):
        name = layer.dtype_policy.name
        if precision == "float32":
            switch = name in MIXED
        elif current == "float32":
            switch = name == "float32" and id(layer) not in pinned and not _pins_float32(layer)
        else:
            switch = name == current
        if switch:
            layer.dtype_policy = precision
    return model


def _pins_float32(layer) -> bool:
    return bool(getattr(layer, "PINS_FLOAT32", False))


def resolve_predict_precision(name: str, trained: str | None, allow_slow: bool = False):
    """(policy name, reason) of a `--precision` value of predict, evaluate or export.

    Args:
        name: one of `PREDICT_PRECISIONS`.
        trained: the precision the run was trained in (its metadata), if known.
        allow_slow: accept mixed_float16 without a GPU (exports made on a CPU
            for a GPU server; tests).

    Raises:
        RmibError: an unknown name, or mixed_float16 without a GPU.
    """
    from rmib import training

    if name not in PREDICT_PRECISIONS:
        raise RmibError(
            f"unknown precision {name!r}; valid values are: {', '.join(PREDICT_PRECISIONS)}"
        )
    if name == "training":
        resolved = trained if trained in SIGNIFICAND_BITS else "float32"
        reason = f"the precision the model was trained in ({trained or 'not recorded'})"
        if resolved == "mixed_float16" and not training.visible_gpus() and not allow_slow:
            raise RmibError(
                "the model was trained in mixed_float16, which needs a GPU to predict; "
                "no GPU is visible: use --precision float32 or auto"
            )
        return resolved, reason
    resolved = training.resolve_precision(name, allow_slow=allow_slow)
    if name == "float32":
        return resolved, "asked for (--precision float32, the default for prediction)"
    return resolved, training.precision_reason(name, resolved)


__all__ = [
    "FLOAT32_TOLERANCE",
    "PREDICT_DEFAULT",
    "PREDICT_PRECISIONS",
    "SIGNIFICAND_BITS",
    "check_tolerance",
    "model_precision",
    "resolve_predict_precision",
    "with_precision",
]
