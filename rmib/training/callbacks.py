"""The learning-rate schedule callbacks and the callbacks `rmib.training.fit` runs.

`schedule_callbacks` (`_ReduceLROnPlateau`, whose counters survive a resume),
and the per-epoch machinery of every run: the non-finite loss guard, the time
limit (`_TimeLimit`) and `_RunCheckpoint` (history row, best and last
checkpoints, state, early stopping). The optimizer is `rmib.training.optimizers`.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from rmib.config import TrainConfig
from rmib.errors import RmibError
from rmib.training.run_dir import RunDirectory

# --------------------------------------------------------------------------- schedules


class _ReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive a resume (saved in the checkpoint state)."""

    def __init__(self, *args, initial_state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_state = initial_state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.initial_state:
            if self.initial_state.get("best") is not None:
                self.best = float(self.initial_state["best"])
            self.wait = int(self.initial_state.get("wait", 0))
            self.cooldown_counter = int(self.initial_state.get("cooldown_counter", 0))

    def on_epoch_end(self, epoch, logs=None):
        # A NaN monitor is a value not computed this epoch (whole-image validation
        # every N epochs): it is no plateau, so it neither waits nor cuts the rate.
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(float(np.asarray(value))):
            return
        super().on_epoch_end(epoch, logs)

    def get_state(self) -> dict:
        # None until a validated epoch was seen (Keras sets it at the first one).
        best = float("nan") if self.best is None else float(self.best)
        return {
            "best": best if math.isfinite(best) else None,
            "wait": int(self.wait),
            "cooldown_counter": int(self.cooldown_counter),
        }


def schedule_callbacks(cfg: TrainConfig, initial_state: dict | None = None) -> list:
    """The callbacks a learning-rate schedule needs: ReduceLROnPlateau for "plateau"."""
    if cfg.lr_schedule != "plateau":
        return []
    return [
        _ReduceLROnPlateau(
            monitor=cfg.monitor,
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            mode=cfg.resolved_monitor_mode,
            min_delta=0.0,
            verbose=0,
            initial_state=initial_state,
        )
    ]


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer applies at its current iteration."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# --------------------------------------------------------------------------- fit's callbacks


class _NonFiniteLoss(Exception):
    def __init__(self, epoch: int, batch: int | None, value: float):
        super().__init__(epoch, batch, value)
        self.epoch, self.batch, self.value = epoch, batch, value


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises as soon as a batch's loss is NaN or infinite, before anything saves it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None:
            value = float(np.asarray(loss))
            if not math.isfinite(value):
                raise _NonFiniteLoss(self.epoch + 1, batch + 1, value)


class _TimeLimit(keras.callbacks.Callback):
    """Stops training when another epoch would not fit in `config.time_limit` minutes.

    Counts the wall-clock time of `fit` (validation included) on top of what
    earlier invocations of this phase spent (`previous`, from the state) and
    the run's other phases (`earlier`: the limit is for the whole run). At the
    end of each epoch it sets `model.stop_training` when the time spent plus
    the mean epoch so far exceeds the limit; it runs before the validation
    callbacks, so they see that the epoch is the last and validate it.
    """

    def __init__(self, limit_minutes: float, previous: float = 0.0, earlier: float = 0.0):
        super().__init__()
        self.limit = 60.0 * float(limit_minutes)
        self.previous = float(previous)
        self.earlier = float(earlier)
        self.reached = False
        self.durations: list[float] = []
        self.start = time.monotonic()

    @property
    def seconds(self) -> float:
        """Training seconds of the run so far, earlier invocations included."""
        return self.previous + time.monotonic() - self.start

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()
        self.epoch_end = self.start

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self.durations.append(now - self.epoch_end)
        self.epoch_end = now
        mean = sum(self.durations) / len(self.durations)
        if self.limit > 0 and self.earlier + self.seconds + mean > self.limit:
            self.reached = True
            self.model.stop_training = True


class _EpochLine(keras.callbacks.Callback):
    """Prints one line per epoch (`verbose=2`): what a log file or a pipe can hold.

    Keras' own verbose=2 writes two lines per epoch, and its bar writes carriage
    returns; this line has the epoch, its seconds and every finite value logged
    (validation callbacks run before it, so their values are in it).
    """

    def __init__(self, epochs: int, phase: str | None = None, echo=print):
        super().__init__()
        self.epochs, self.phase, self.echo = epochs, phase, echo
        self.start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self.echo(
            epoch_line(epoch + 1, self.epochs, logs, time.monotonic() - self.start, self.phase)
        )


def epoch_line(epoch: int, epochs: int, logs, seconds: float, phase: str | None = None) -> str:
    """ "epoch 3/10 (phase local) 12.3 s: loss 0.4123, val_aupr 0.5012" (non-finite values left out)."""
    values = []
    for key, value in (logs or {}).items():
        if np.size(value) != 1:
            continue
        number = float(np.asarray(value))
        if math.isfinite(number):
            values.append(f"{key} {number:.4g}")
    where = f" (phase {phase})" if phase else ""
    return f"epoch {epoch}/{epochs}{where} {seconds:.1f} s: " + ", ".join(values)


class _RunCheckpoint(keras.callbacks.Callback):
    """At each epoch end: history row, best and last checkpoints, state, early stopping.

    `last.keras` carries the new state inside it, so it is the commit point of
    an epoch; `state.json` mirrors it for people and tools.
    """

    def __init__(
        self,
        run: RunDirectory,
        cfg: TrainConfig,
        phase,
        state,
        history,
        metadata,
        plateau,
        clock: _TimeLimit | None = None,
    ):
        super().__init__()
        self.run, self.cfg, self.phase = run, cfg, phase
        self.state, self.history, self.metadata = state, history, metadata
        self.plateau = plateau
        self.clock = clock
        self.mode = cfg.resolved_monitor_mode

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_learning_rate = current_learning_rate(self.model.optimizer)

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        best = self.state.get("best")
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(np.asarray(v)) for k, v in (logs or {}).items() if np.size(v) == 1}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise _NonFiniteLoss(epoch + 1, None, loss)
        if self.cfg.monitor not in logs:
            raise RmibError(
                f"monitor {self.cfg.monitor!r} is not among the values logged by training: "
                f"{', '.join(sorted(logs))}; set monitor to one of them"
            )
        done = epoch + 1
        logs["learning_rate"] = self.epoch_learning_rate  # the rate the epoch started with
        self.history[:] = [row for row in self.history if row["epoch"] < done]
        self.history.append({"epoch": done, **logs})
        self.run.write_history(self.history, self.phase)

        value = logs[self.cfg.monitor]
        improved = self._improved(value)
        if improved:
            self.state.update(best=value, best_epoch=done)
        patience = self.cfg.early_stopping_patience
        # A NaN monitor is a value not computed this epoch (e.g. whole-image
        # validation every N epochs): it never stops a run before it is measured.
        stop = (
            patience > 0
            and math.isfinite(value)
            and done - self.state.get("best_epoch", 0) >= patience
        )
        self.state.update(
            epoch=done,
            monitor=self.cfg.monitor,
            mode=self.mode,
            early_stopped=stop,
            train_seconds=round(self.clock.seconds, 3) if self.clock else None,
            time_limited=bool(self.clock and self.clock.reached),
            time_limit=self.cfg.time_limit,
            iterations=int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
            plateau=self.plateau.get_state() if self.plateau else None,
            seed_generators=_seed_generator_states(self.model),
        )
        checkpoint = {**self.metadata, "checkpoint": dict(self.state)}
        if improved:
            self.run.save_model(
                self.model, self.run.checkpoint_path("best", self.phase), checkpoint
            )
        self.run.save_model(self.model, self.run.checkpoint_path("last", self.phase), checkpoint)
        self.run.write_state(self.state, self.phase)
        if stop:
            self.model.stop_training = True


def _seed_generators(model) -> list:
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _seed_generator_states(model) -> list[list[int]]:
    """The (seed, counter) of every random layer (Dropout ...), in model order.

    Keras saves no seed-generator state in `.keras` files, and a reloaded
    layer draws a fresh seed; without these a resumed run would drop other
    units than an uninterrupted one (tests/integration/test_crash_safety.py).
    """
    return [
        [int(x) for x in np.asarray(keras.ops.convert_to_numpy(v))] for v in _seed_generators(model)
    ]


def _restore_seed_generators(model, states, path) -> None:
    if states is None:  # a checkpoint written before rmib saved them
        return
    variables = _seed_generators(model)
    if len(states) != len(variables):
        raise RmibError(
            f"{path}: the checkpoint holds {len(states)} random-generator states but the "
            f"model has {len(variables)} random layers; it does not belong to this model"
        )
    for variable, value in zip(variables, states, strict=True):
        variable.assign(np.asarray(value, dtype=variable.dtype))
