"""The optimizer of every rmib training run: `make_optimizer` and the classes it builds.

`FusedAdam` (Keras' Adam with each variable's update one TensorFlow kernel),
`CoupledDecayAdam` and `CoupledDecaySGD` (PyTorch's coupled weight decay), and
`make_optimizer`, which picks one from a `TrainConfig` (Adam or SGD, decoupled
or coupled weight decay, polynomial decay, the loss-scale wrapper of
mixed_float16).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from rmib.config import TrainConfig
from rmib.errors import RmibError

# Variable dtypes given to the kernel. It forms 1 - beta in the variable dtype, which in
# float16 is 2 % off for beta_2 = 0.999 (Keras: 0.001 rounded once): float16 and bfloat16
# variables (never rmib's: its mixed policies keep float32 variables) take Keras' update.
_FUSED_DTYPES = ("float32", "float64")


class _AdamScalars(NamedTuple):
    """One step's scalars in one variable dtype (computed once per step, not per variable)."""

    learning_rate: object
    beta_1_power: object
    beta_2_power: object
    beta_1: object
    beta_2: object
    epsilon: object


@keras.saving.register_keras_serializable(package="rmib")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose update of each variable is one TensorFlow kernel.

    Keras 3's Adam writes its update as ~26 graph ops per variable (reads, subtract,
    multiply, square, sqrt, divide, three assigns, its scalars), the large ones each
    a pass over the variable: 5,642 ops a step for ResNet50
    (benchmarks/profiles/resnet50_step.md). On the
    TensorFlow backend this class gives each variable to `ResourceApplyAdam`
    instead, one kernel reading the gradient, variable and both moments once, and
    computes the step's scalars (learning rate, beta powers, in each variable
    dtype) once per step rather than once per variable.

    The formulas are Keras' (`keras.src.optimizers.adam.Adam.update_step`), with
    t = iterations + 1 and b1^t, b2^t computed as Keras does (powers of the betas
    cast to the variable dtype):

        Keras:             m += (g - m)(1 - b1);  v += (g^2 - v)(1 - b2);
                           var -= m * alpha / (sqrt(v) + eps),
                           alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
        ResourceApplyAdam: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t);
                           m_t = b1 m + (1 - b1) g;  v_t = b2 v + (1 - b2) g^2;
                           var -= lr_t * m_t / (sqrt(v_t) + eps)
                           (its CPU kernel evaluates m += (g - m)(1 - b1), ... in
                           Keras' order)

    One rounding differs: the kernel forms 1 - b2 in the variable dtype
    (float32: 1 - 0.999f = 0.00099998713), Keras rounds Python's 1 - 0.999 to
    float32 (0.001f). So in float32 the second moment v differs from Keras' by
    ~1.3e-5 relative (1 - b1 by ~2e-7) and a step's change of a variable by
    ~6e-6 relative (at most ~lr x 1e-5): the kernel is Adam with
    b2 = float32(0.999) in both v and its bias correction, Keras mixes the two
    values, and the weights of both are within 1e-6 of float64 Adam
    (tests/training/test_optimizers.py). Only float32 and float64 variables are
    fused (in float16, 1 - b2 formed by the kernel is 2 % off).

    Everything around the update is Keras' own: gradient clipping, decoupled
    `weight_decay` (applied separately before the update), EMA, gradient
    accumulation, loss scaling (`LossScaleOptimizer` wrapping this class), and
    `tf.distribute` (the update runs per replica inside `strategy.extended.update`,
    where a mirrored slot's `.handle` is that replica's copy). The optimizer's
    variables (names, order, count) are Adam's, so checkpoints written by
    either load into the other. AMSGrad, sparse (IndexedSlices) gradients,
    other backends and float16 / bfloat16 / non-float variables take Keras'
    update (`super()`).

    Args:
        *args, **kwargs: those of `keras.optimizers.Adam`.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("name") is None and type(self) is FusedAdam:
            # Keras' Adam's names ("adam", "adam_1", ...), so its variables keep their
            # paths ("adam/dense_kernel_momentum"); subclasses keep their class's name.
            uid = keras.backend.get_uid("adam")
            kwargs["name"] = "adam" if uid == 1 else f"adam_{uid - 1}"
        super().__init__(*args, **kwargs)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._fuses():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        # Computed here, in the replica context, and passed on as the learning rate:
        # tf.distribute hands each replica's update its own replica's values.
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in trainable_variables}
        scalars = {dtype: self._adam_scalars(learning_rate, dtype) for dtype in sorted(dtypes)}
        return super()._backend_update_step(grads, trainable_variables, scalars)

    def update_step(self, gradient, variable, learning_rate):
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if isinstance(learning_rate, dict):
            scalars = learning_rate[dtype]
        else:  # called directly, not through apply()
            scalars = self._adam_scalars(learning_rate, dtype) if self._fuses() else None
        index = self._get_variable_index(variable)
        slots = (variable, self._momentums[index], self._velocities[index])
        resources = [_tf_variable(slot) for slot in slots]
        fused = (
            scalars is not None
            and dtype in _FUSED_DTYPES
            and not isinstance(gradient, tf.IndexedSlices)
            and all(isinstance(r, tf.Variable) for r in resources)
        )
        if not fused:
            rate = scalars.learning_rate if scalars is not None else learning_rate
            return super().update_step(gradient, variable, rate)
        var, momentum, velocity = resources
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle,
            m=momentum.handle,
            v=velocity.handle,
            beta1_power=scalars.beta_1_power,
            beta2_power=scalars.beta_2_power,
            lr=scalars.learning_rate,
            beta1=scalars.beta_1,
            beta2=scalars.beta_2,
            epsilon=scalars.epsilon,
            grad=tf.cast(gradient, var.dtype),
        )

    def _fuses(self) -> bool:
        return keras.backend.backend() == "tensorflow" and not self.amsgrad

    def _adam_scalars(self, learning_rate, dtype) -> _AdamScalars:
        # As Keras' Adam.update_step: t = iterations + 1, powers of the cast betas.
        ops = keras.ops
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        return _AdamScalars(
            learning_rate=ops.cast(learning_rate, dtype),
            beta_1_power=ops.power(beta_1, local_step),
            beta_2_power=ops.power(beta_2, local_step),
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
        )


def _tf_variable(variable):
    """The tf.Variable behind a Keras variable (TFOptimizer's own `variable.value`)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class _CoupledWeightDecay:
    """Adds weight_decay * w to every gradient before the optimizer's update (L2 coupled
    into the gradient, as PyTorch's SGD and Adam `weight_decay`)."""

    def __init__(self, *args, coupled_weight_decay=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)

    def update_step(self, gradient, variable, learning_rate):
        decay = keras.ops.cast(self.coupled_weight_decay, variable.dtype)
        gradient = keras.ops.add(gradient, keras.ops.multiply(decay, variable))
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


@keras.saving.register_keras_serializable(package="rmib")
class CoupledDecaySGD(_CoupledWeightDecay, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with PyTorch's coupled weight decay.

    Each step uses g + coupled_weight_decay * w as the gradient, so with momentum
    m and learning rate lr: v <- m * v - lr * (g + wd * w); w <- w + v (Keras'
    momentum form; PyTorch's buf <- m * buf + g', w <- w - lr * buf is the same
    for a constant lr).

    Args:
        coupled_weight_decay: the factor wd (5e-4 in Dual2Net's paper).
        *args, **kwargs: the arguments of `keras.optimizers.SGD` (leave its
            decoupled `weight_decay` unset).
    """


@keras.saving.register_keras_serializable(package="rmib")
class CoupledDecayAdam(_CoupledWeightDecay, FusedAdam):
    """`FusedAdam` with coupled weight decay (L2 in the gradient, as PyTorch's
    `Adam(weight_decay=...)`: g + wd * w goes into the fused update); see
    `CoupledDecaySGD`."""


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int | None = None):
    """The optimizer and learning-rate schedule of a `TrainConfig`.

    Adam (`FusedAdam` on the TensorFlow backend, else Keras' Adam), or SGD with
    `cfg.momentum`; `cfg.weight_decay` > 0 adds weight decay,
    Keras' decoupled form or, with `weight_decay_mode` "coupled", wd * w added to
    the gradient (`CoupledDecaySGD`, `CoupledDecayAdam`). "poly" decays the rate polynomially (power
    `cfg.poly_power`) to 0 over `cfg.epochs * steps_per_epoch` steps;
    "plateau" keeps it constant here and `schedule_callbacks` cuts it. Under
    the mixed_float16 policy the optimizer is wrapped in a LossScaleOptimizer
    (Keras' compile then leaves it as is).

    Raises:
        RmibError: "poly" without a known number of steps per epoch.
    """
    learning_rate = cfg.learning_rate
    if cfg.lr_schedule == "poly":
        if not steps_per_epoch:
            raise RmibError(
                "the poly learning-rate schedule needs the number of steps per epoch, and the "
                "training data does not tell it (an infinite dataset?); set steps_per_epoch"
            )
        learning_rate = keras.optimizers.schedules.PolynomialDecay(
            initial_learning_rate=cfg.learning_rate,
            decay_steps=cfg.epochs * int(steps_per_epoch),
            end_learning_rate=0.0,
            power=cfg.poly_power,
        )
    coupled = cfg.weight_decay > 0 and cfg.weight_decay_mode == "coupled"
    decay = {"coupled_weight_decay": cfg.weight_decay} if coupled else {}
    if not coupled:
        decay["weight_decay"] = cfg.weight_decay or None
    if cfg.optimizer == "adam":
        fused = keras.backend.backend() == "tensorflow"
        adam = CoupledDecayAdam if coupled else FusedAdam if fused else keras.optimizers.Adam
        optimizer = adam(learning_rate=learning_rate, **decay)
    elif cfg.optimizer == "sgd":
        sgd = CoupledDecaySGD if coupled else keras.optimizers.SGD
        optimizer = sgd(learning_rate=learning_rate, momentum=cfg.momentum, **decay)
    else:  # TrainConfig validates the name; this guards hand-made objects
        raise RmibError(f"unknown optimizer {cfg.optimizer!r}; valid values are: adam, sgd")
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
