"""The one training runner every rmib method uses: `fit`.

It owns what every method shares: numeric precision and the distribution
strategy (`rmib.training.devices`), the optimizer (`rmib.training.optimizers`),
learning-rate schedule and per-epoch callbacks (`rmib.training.callbacks`), seeding, the run directory
on disk (`rmib.training.run_dir`), checkpoints, resuming, early stopping, the
time limit and the history. Under MultiWorkerMirroredStrategy the epochs run
through `strategy.run` (`rmib.training.distributed`). A method's whole run
(data, phases, validation, final model, report) is `rmib.training.job`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from rmib.config import TrainConfig, config_to_dict
from rmib.console import training_verbosity
from rmib.errors import RmibError, first_line
from rmib.training.callbacks import (
    _EpochLine,
    _NonFiniteLoss,
    _restore_seed_generators,
    _RunCheckpoint,
    _StopOnNonFiniteLoss,
    _TimeLimit,
    schedule_callbacks,
)
from rmib.training.devices import (
    apply_precision,
    get_strategy,
    global_batch_size,
    precision_reason,
)
from rmib.training.distributed import _metrics_in_scope, distributed_fit, is_arrays, steps_of
from rmib.training.optimizers import make_optimizer
from rmib.training.run_dir import (
    RunDirectory,
    checkpoint_state,
    load_model,
    worker_run_directory,
)

_PHASE = re.compile(r"[A-Za-z0-9_-]+")


def class_weights_from_labels(labels) -> dict[int, float]:
    """Balanced class weights {0: w0, 1: w1}, w_c = n / (2 * n_c), for binary labels.

    Raises:
        ValueError: labels other than 0 and 1.
        RmibError: one of the two classes is absent (no weight can balance it).
    """
    labels = np.asarray(labels).reshape(-1)
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"class weights need binary labels 0/1, got values {sorted(values)}")
    n = labels.size
    counts = {c: int(np.sum(labels == c)) for c in (0, 1)}
    missing = [c for c, k in counts.items() if k == 0]
    if missing:
        raise RmibError(
            f"class weights need both classes, but the {n} training labels have no "
            f"class {missing[0]}; turn class_weights off or add examples of it"
        )
    return {c: n / (2.0 * k) for c, k in counts.items()}


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; with `deterministic`, also make TF ops deterministic.

    Deterministic ops are slower, and some ops have no deterministic kernel
    (TensorFlow then raises when they run).
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _check_float32_outputs(model) -> None:
    outputs = getattr(model, "outputs", None) or []
    wrong = sorted({str(t.dtype) for t in keras.tree.flatten(outputs)} - {"float32"})
    if wrong:
        raise ValueError(
            f"model {model.name!r} has outputs of dtype {', '.join(wrong)}: give its output "
            "layers dtype='float32' so outputs, losses and metrics stay in float32 under "
            "mixed precision"
        )


def run_finished(state: dict | None, cfg: TrainConfig) -> bool:
    """Whether a run (phase) whose saved state is `state` has nothing left to train.

    Finished: all `cfg.epochs` done, stopped early, or its time limit reached
    (under the current `cfg.time_limit`, so a resumed run with a longer limit
    goes on).
    """
    if not state:
        return False
    if state.get("early_stopped") or state.get("epoch", 0) >= cfg.epochs:
        return True
    limited = state.get("time_limited") and state.get("time_limit")
    return bool(limited) and 0 < cfg.time_limit <= float(state["time_limit"])


def _say(message: str, verbose) -> None:
    if verbose:
        print(f"rmib: {message}", flush=True)


def _print_line(line: str) -> None:
    print(line, flush=True)


def _history_columns(rows: list[dict]) -> dict[str, list]:
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            values.append(row.get(key))
    return columns


def fit(
    model,
    train_data,
    val_data=None,
    *,
    config: TrainConfig,
    run_dir,
    loss,
    metrics=None,
    compile_kwargs: dict | None = None,
    metadata: dict | None = None,
    phase: str | None = None,
    resume: bool = False,
    extra_callbacks: Iterable = (),
    validation_callbacks: Iterable = (),
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    class_weight: dict | None = None,
    save_final: bool = True,
    time_spent: float = 0.0,
    allow_slow: bool = False,
    unsafe_load: bool = False,
    verbose=None,
):
    """Train a model in a run directory: the one runner every rmib command uses.

    Sets the (global) precision policy, the seed and the distribution strategy, builds
    (or, on resume, reloads) the model and its optimizer inside the strategy's
    scope, compiles, trains with Keras progress bars, and after every epoch
    writes the history row, `checkpoints/last.keras` (with optimizer state),
    `checkpoints/best.keras` when `config.monitor` improves, and the state.
    Stops early after `config.early_stopping_patience` epochs without
    improvement, and at the end keeps the best weights (`config.restore_best`)
    and saves `model.keras` with the metadata. Under strategy "multiworker"
    the epochs run in `_distributed_fit` (Keras' own fit fails there), with
    the same callbacks and files; workers other than the chief write theirs
    under `<run_dir>/workers/<task>_<index>/`.

    Args:
        model: a function returning a new (uncompiled) `keras.Model`, called
            inside the strategy scope after the precision policy is set; or a
            model already built (default strategy only). On resume the model
            is rebuilt from the checkpoint instead, so every layer must be
            savable (registered serializable).
        train_data: a `tf.data.Dataset` of (x, y[, sample_weight]) batched by
            the global batch size (`global_batch_size(config)`: `config.batch_size`
            per replica), or a tuple of arrays (x, y[, sample_weight]), which
            `fit` batches so.
        val_data: validation data in the same form, or None.
        config: the `TrainConfig`.
        run_dir: the run directory (a path or a `RunDirectory`).
        loss, metrics: for `model.compile`; they must be serializable (a Keras
            loss/metric object or a registered function), since checkpoints
            store them.
        compile_kwargs: further `model.compile` arguments (loss_weights, jit_compile, ...).
        metadata: what goes into `rmib.json` and the saved models (task,
            lesion, backbone, preprocessing, sizes ...); the resolved precision
            and versions are added.
        phase: name of the phase for methods trained in phases; its files are
            `history_<phase>.csv`, `checkpoints/last_<phase>.keras` ...
        resume: continue from `checkpoints/last.keras` (model and optimizer
            state, epoch, best value); a finished phase returns its model
            without training; without a checkpoint the phase starts afresh.
            Temporary files of writes a crash interrupted are removed first.
        extra_callbacks: more Keras callbacks, run after rmib's own.
        validation_callbacks: callbacks that add validation values to the epoch's
            logs themselves (e.g. whole-image metrics of a segmenter); they run
            before the checkpoint, so `config.monitor` may name what they log.
        steps_per_epoch, validation_steps: override the config's values.
        class_weight: {class: weight}; None with `config.class_weights` computes
            balanced weights from array labels.
        save_final: save `model.keras` when training ends (False for the
            intermediate phases of a phased method).
        time_spent: seconds of training the run spent outside this phase (its
            earlier phases, `rmib.training.job`): `config.time_limit` is for
            the whole run, so they count against it.
        allow_slow: accept mixed_float16 on a CPU (tests only).
        unsafe_load: allow Lambda layers when reloading a checkpoint.
        verbose: 0 silent, 1 Keras' progress bar, 2 one line per epoch; None:
            `rmib.console.training_verbosity` (the bar on a terminal, else lines).

    Returns:
        (model, history): the trained model (best weights with
        `config.restore_best`) and the history of every epoch of this phase
        as {column: [value per epoch]}, columns "epoch", "loss", metrics and
        "learning_rate" (the rate the epoch started with).

    Raises:
        RmibError: the loss became NaN or infinite (the last good checkpoint
            is kept), the monitor is not logged, the run directory already
            holds this phase and `resume` is False, and the errors of
            `resolve_precision`, `get_strategy` and `load_model`.
    """
    cfg = config
    verbose = training_verbosity(verbose)
    strategy = get_strategy(cfg.strategy)
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
    # Every worker saves the same weights; only the chief writes the run itself.
    run = worker_run_directory(run, strategy)
    batch_size = global_batch_size(cfg, strategy)
    if phase is not None and not _PHASE.fullmatch(phase):
        raise ValueError(f"phase must be letters, digits, '_' or '-', got {phase!r}")
    validation_callbacks = list(validation_callbacks)
    if cfg.monitor.startswith("val_") and val_data is None and not validation_callbacks:
        raise RmibError(
            f"monitor {cfg.monitor!r} needs validation data, and there is none; "
            "set monitor to a training value such as 'loss'"
        )
    if cfg.time_limit and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise RmibError(
            "time_limit is not supported with strategy multiworker (the workers' clocks "
            "would stop them at different epochs); set a number of epochs instead"
        )
    last_path = run.checkpoint_path("last", phase)
    if not resume and last_path.exists():
        raise RmibError(
            f"{run.path} already holds a run ({last_path.name} exists); continue it with "
            "--resume, or choose another output directory"
        )

    precision = apply_precision(cfg.precision, allow_slow=allow_slow)
    _say(f"precision {precision}: {precision_reason(cfg.precision, precision)}", verbose)
    run_metadata = run.write_metadata({**(metadata or {}), "precision": precision})
    if not run.config_path.exists():
        run.write_config({"train": config_to_dict(cfg)})
    compile_args = dict(loss=loss, metrics=metrics, **(compile_kwargs or {}))

    if resume:
        for path in run.remove_temporary_files():
            _say(f"removed {path}, left by a write that a crash interrupted", verbose)
    state = _saved_state(run, cfg, phase, verbose) if resume else {}
    if run_finished(state, cfg):
        _say(
            f"{run.path}{_phase_text(phase)} already finished at epoch {state['epoch']}; "
            "nothing to train",
            verbose,
        )
        return _finished_run(run, cfg, phase, run_metadata, compile_args, save_final, unsafe_load)

    initial_epoch = int(state.get("epoch", 0))
    set_seed(cfg.seed + initial_epoch, cfg.deterministic)
    if class_weight is None and cfg.class_weights:
        if not is_arrays(train_data):
            raise ValueError(
                "config.class_weights is on: pass class_weight=class_weights_from_labels(labels)"
            )
        class_weight = class_weights_from_labels(train_data[1])
    steps = steps_per_epoch or cfg.steps_per_epoch or steps_of(train_data, batch_size)

    if state:
        _say(f"resuming{_phase_text(phase)} from {last_path} after epoch {initial_epoch}", verbose)
    elif isinstance(model, keras.Model):
        _check_built_model(model, cfg, strategy, precision)
    with strategy.scope():
        if state:
            model = load_model(last_path, unsafe=unsafe_load)
        elif not isinstance(model, keras.Model):
            model = model()
        _check_float32_outputs(model)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Metric objects made outside the scope hold per-worker variables.
            compile_args["metrics"] = _metrics_in_scope(compile_args.get("metrics"))
        _compile(model, make_optimizer(cfg, steps), compile_args)
        if state:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(last_path)  # restores the optimizer state too
            _restore_seed_generators(model, state.get("seed_generators"), last_path)

    plateau = schedule_callbacks(cfg, state.get("plateau"))
    history = [row for row in run.read_history(phase) if row["epoch"] <= initial_epoch]
    clock = _TimeLimit(cfg.time_limit, state.get("train_seconds") or 0.0, earlier=time_spent)
    checkpoint = _RunCheckpoint(
        run, cfg, phase, state, history, run_metadata, plateau[0] if plateau else None, clock
    )
    callbacks = [_StopOnNonFiniteLoss(), clock, *validation_callbacks, *plateau, checkpoint]
    if verbose == 2:
        callbacks.append(_EpochLine(cfg.epochs, phase, echo=_print_line))
    if cfg.tensorboard:
        log_dir = run.tensorboard_dir / phase if phase else run.tensorboard_dir
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, profile_batch=0)
        )
    callbacks.extend(extra_callbacks)

    try:
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            distributed_fit(
                model,
                strategy,
                train_data,
                val_data,
                cfg=cfg,
                batch_size=batch_size,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch or cfg.steps_per_epoch,
                validation_steps=validation_steps or cfg.validation_steps,
                class_weight=class_weight,
                callbacks=callbacks,
                verbose=1 if verbose == 1 else 0,  # 2: _EpochLine's lines
            )
        else:
            model.fit(
                **_data_arguments(train_data, batch_size),
                validation_data=tuple(val_data) if is_arrays(val_data) else val_data,
                epochs=cfg.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch or cfg.steps_per_epoch,
                validation_steps=validation_steps or cfg.validation_steps,
                class_weight=class_weight,
                callbacks=callbacks,
                verbose=1 if verbose == 1 else 0,  # 2: _EpochLine's lines
            )
    except _NonFiniteLoss as bad:
        where = f"epoch {bad.epoch}" + (f", batch {bad.batch}" if bad.batch else "")
        kept = (
            f"the last good checkpoint {last_path} (epoch {state['epoch']}) is kept"
            if state.get("epoch")
            else "no epoch had finished, so there is no checkpoint"
        )
        raise RmibError(
            f"training stopped: the loss became {bad.value} at {where}{_phase_text(phase)}; "
            f"{kept}. Try a lower learning rate or --precision float32, then --resume"
        ) from None

    if not run_finished(state, cfg):
        _say(
            f"stopped after epoch {state.get('epoch', initial_epoch)} of {cfg.epochs}; "
            "continue with --resume",
            verbose,
        )
        return model, _history_columns(run.read_history(phase))
    if state.get("early_stopped"):
        _say(
            f"early stopping after epoch {state['epoch']}: no improvement of {cfg.monitor} "
            f"since epoch {state['best_epoch']}",
            verbose,
        )
    elif state.get("time_limited") and state.get("epoch", 0) < cfg.epochs:
        _say(
            f"time limit of {cfg.time_limit:g} min reached after epoch {state['epoch']} "
            f"({state['train_seconds'] / 60:.1f} min of training)",
            verbose,
        )
    return _finish(run, cfg, phase, state, model, run_metadata, save_final, unsafe_load)


def _saved_state(run: RunDirectory, cfg: TrainConfig, phase, verbose) -> dict:
    """The state of the last checkpoint (the copy inside last.keras is authoritative)."""
    last_path = run.checkpoint_path("last", phase)
    if not last_path.is_file():
        _say(f"nothing to resume in {run.checkpoints_dir}; starting at epoch 1", verbose)
        return {}
    state = checkpoint_state(run, phase)
    if state and (state.get("monitor"), state.get("mode")) != (
        cfg.monitor,
        cfg.resolved_monitor_mode,
    ):
        _say(
            f"the monitor is now {cfg.monitor} ({cfg.resolved_monitor_mode}): "
            "the best epoch is chosen afresh",
            verbose,
        )
        for key in ("best", "best_epoch", "plateau"):
            state.pop(key, None)
    return dict(state)


def _check_built_model(model, cfg: TrainConfig, strategy, precision: str) -> None:
    if strategy is not tf.distribute.get_strategy():
        raise ValueError(
            f"strategy {cfg.strategy!r} needs the model built inside its scope: pass a "
            "function that builds the model instead of a built model"
        )
    if model.dtype_policy.name != precision:
        warnings.warn(
            f"model {model.name!r} was built with dtype policy {model.dtype_policy.name!r} "
            f"but the precision is {precision!r}; pass a function that builds the model "
            "so that it is built after the precision is set",
            stacklevel=3,
        )


def _data_arguments(train_data, batch_size: int) -> dict:
    if isinstance(train_data, tf.data.Dataset):
        return dict(x=train_data, shuffle=False)  # a dataset shuffles itself
    if not is_arrays(train_data):
        return dict(x=train_data)
    x, y, *sample_weight = train_data
    arguments = dict(x=x, y=y, batch_size=batch_size, shuffle=True)
    if sample_weight:
        arguments["sample_weight"] = sample_weight[0]
    return arguments


def _compile(model, optimizer, compile_args: dict) -> None:
    model.compile(optimizer=optimizer, **compile_args)
    try:
        model.get_compile_config()
    except TypeError as exc:
        raise ValueError(
            f"the loss and metrics must be serializable to be checkpointed: {first_line(exc)}"
        ) from exc


def _phase_text(phase) -> str:
    return f" (phase {phase})" if phase else ""


def _finished_run(run, cfg, phase, metadata, compile_args, save_final, unsafe_load):
    """The model of a finished phase, compiled, without training."""
    best_path = run.checkpoint_path("best", phase)
    use_best = cfg.restore_best and best_path.is_file()
    path = best_path if use_best else run.checkpoint_path("last", phase)
    # A finished run needs no schedule (and its steps per epoch may be unknown).
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    with get_strategy(cfg.strategy).scope():
        model = load_model(path, unsafe=unsafe_load)
        _compile(model, make_optimizer(constant), compile_args)
    if save_final and not run.model_path.is_file():  # a crash just before the final save
        run.save_model(model, run.model_path, metadata)
    return model, _history_columns(run.read_history(phase))


def _finish(run, cfg, phase, state, model, metadata, save_final, unsafe_load):
    best_path = run.checkpoint_path("best", phase)
    if cfg.restore_best and best_path.is_file() and state.get("best_epoch") != state.get("epoch"):
        best = load_model(best_path, unsafe=unsafe_load)
        model.set_weights(best.get_weights())
    key = "training" if phase is None else f"training_{phase}"
    rows = run.read_history(phase)
    run.update_metrics(
        {
            key: {
                "monitor": cfg.monitor,
                "mode": cfg.resolved_monitor_mode,
                "best": state.get("best"),
                "best_epoch": state.get("best_epoch"),
                "epochs_trained": state.get("epoch"),
                "early_stopped": bool(state.get("early_stopped")),
                "time_limited": bool(state.get("time_limited")),
                "train_seconds": state.get("train_seconds"),
                "weights": "best" if cfg.restore_best and best_path.is_file() else "last",
                "last_epoch": rows[-1] if rows else {},
            }
        }
    )
    if save_final:
        run.save_model(model, run.model_path, metadata)
    return model, _history_columns(rows)
