"""The one training runner every rmib command uses.

It owns what every method shares: numeric precision, the distribution
strategy, the optimizer and learning-rate schedule, seeding, the run
directory on disk, checkpoints, resuming, early stopping and the history.

Run directory (one per training command, see DESIGN.md "Runs and models on disk"):

    config.toml            the resolved config
    rmib.json              task, lesion, backbone, preprocessing, sizes, precision,
                           rmib version, creation time
    history.csv            one row per epoch (history_<phase>.csv for phased methods)
    metrics.json           summary of training (and later evaluation) results
    checkpoints/last.keras model + optimizer state after the latest epoch
    checkpoints/best.keras the best epoch by `TrainConfig.monitor`
    checkpoints/state.json epoch, best value, early-stopping and plateau state
                           (last_<phase>.keras, best_<phase>.keras, state_<phase>.json)
    model.keras            the final model
    tensorboard/           TensorBoard logs

Every file is written atomically (`rmib.io.atomic_write` / `atomic_path`), so a
crash leaves the previous version, never a partial one.

Metadata inside `.keras` files: every model rmib saves carries the contents of
`rmib.json` inside its archive, so a `.keras` file copied elsewhere still says
which lesion, preprocessing and input size it expects. The dict is attached to
the model as a Keras saveable object (`rmib_metadata`) whose `save_assets`
writes it, so Keras itself stores it in the archive as
`assets/rmib_metadata/rmib.json` while saving, in the same pass as the model;
loading ignores it, and `read_run_metadata` reads it back without TensorFlow.
Nothing is appended to an archive after Keras wrote it, and the model's
layers, outputs and class are left untouched. Checkpoints also carry their
training state there (key "checkpoint"), written in the same atomic rename as
the weights, which makes `last.keras` the single commit point of an epoch.
That state includes the seed-generator states of random layers (Dropout),
which Keras leaves out of `.keras` files: restoring them makes a run resumed
after a crash equal, weight for weight, to an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import io
import json
import math
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# Keras has no public base class for objects that save assets; this one is
# what its own saving code walks. tests/test_training.py guards the behaviour.
from keras.src.saving.keras_saveable import KerasSaveable

import rmib
from rmib.config import PRECISIONS, STRATEGIES, TrainConfig, config_to_dict, dump_toml
from rmib.errors import RmibError
from rmib.io import atomic_path, atomic_write, remove_atomic_temporaries

CPUINFO = Path("/proc/cpuinfo")
# x86 flags of CPUs with native bfloat16 maths (Intel AMX, AVX512-BF16 on
# Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
METADATA_ATTRIBUTE = "rmib_metadata"
METADATA_ASSET = f"assets/{METADATA_ATTRIBUTE}/rmib.json"
_PHASE = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------- precision


def visible_gpus() -> list:
    """The GPUs TensorFlow can use."""
    return tf.config.list_physical_devices("GPU")


def cpu_supports_bfloat16(cpuinfo=None) -> bool:
    """True when the CPU has native bfloat16 instructions (AMX or AVX512-BF16).

    Reads the `flags` line of `cpuinfo` (default `/proc/cpuinfo`); False when
    it cannot be read.
    """
    return bool(_bfloat16_flags(cpuinfo))


def resolve_precision(name: str = "auto", allow_slow: bool = False) -> str:
    """The Keras dtype policy name for a `--precision` value.

    "auto" is mixed_float16 when a GPU is visible, mixed_bfloat16 on a CPU
    with native bfloat16 support, float32 otherwise.

    Args:
        name: one of "auto", "float32", "mixed_float16", "mixed_bfloat16".
        allow_slow: accept mixed_float16 without a GPU (only for tests on tiny models).

    Raises:
        RmibError: unknown name (listing the valid ones), or mixed_float16
            without a GPU.
    """
    if name not in PRECISIONS:
        raise RmibError(f"unknown precision {name!r}; valid values are: {', '.join(PRECISIONS)}")
    has_gpu = bool(visible_gpus())
    if name == "auto":
        if has_gpu:
            return "mixed_float16"
        return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"
    if name == "mixed_float16" and not has_gpu and not allow_slow:
        raise RmibError(
            "precision mixed_float16 needs a GPU: no GPU is visible, and on a CPU float16 "
            "maths is emulated and hundreds of times slower; use --precision auto "
            "(mixed_bfloat16 on CPUs that support it, float32 otherwise) or mixed_bfloat16"
        )
    return name


def precision_reason(name: str, resolved: str) -> str:
    """Why `--precision name` resolved to `resolved`, in a few words for the log.

    Example: "the CPU has avx512_bf16" for auto -> mixed_bfloat16.
    """
    if name != "auto":
        return f"asked for (--precision {name})"
    if resolved == "mixed_float16":
        return f"auto: {len(visible_gpus())} GPU(s) visible"
    flags = _bfloat16_flags()
    if resolved == "mixed_bfloat16":
        return f"auto: the CPU has {', '.join(flags)}"
    return "auto: no GPU, and the CPU has no native bfloat16 (" + " or ".join(BF16_CPU_FLAGS) + ")"


def _bfloat16_flags(cpuinfo=None) -> list:
    """The flags of `BF16_CPU_FLAGS` that `cpuinfo` (default `CPUINFO`) lists."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return []


def apply_precision(name: str = "auto", allow_slow: bool = False) -> str:
    """Set the Keras global dtype policy for `name` and return the resolved name.

    Models built afterwards compute in that precision; rmib models keep their
    outputs (and all losses and metrics) in float32.
    """
    resolved = resolve_precision(name, allow_slow=allow_slow)
    keras.mixed_precision.set_global_policy(resolved)
    return resolved


# --------------------------------------------------------------------------- strategy


def _default_strategy():
    return tf.distribute.get_strategy()


def _mirrored_strategy():
    return tf.distribute.MirroredStrategy()


def _multiworker_strategy():
    """MultiWorkerMirroredStrategy over the cluster described by TF_CONFIG."""
    if not os.environ.get("TF_CONFIG", "").strip():
        raise RmibError(
            "strategy multiworker needs the TF_CONFIG environment variable, which lists "
            "the workers and says which one this process is (see the README section "
            "'Training on several machines')"
        )
    try:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        workers = resolver.cluster_spec().as_dict()
    except (ValueError, KeyError, TypeError) as exc:
        raise RmibError(f"TF_CONFIG is not a valid cluster description: {exc}") from None
    if not workers or resolver.task_type is None:
        raise RmibError(
            'TF_CONFIG must hold a \'cluster\' (e.g. {"worker": ["host1:port", "host2:port"]}) '
            'and this process\'s \'task\' ({"type": "worker", "index": 0})'
        )
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


def _tpu_strategy():
    """TPUStrategy over the TPU that TPUClusterResolver finds (Cloud TPU VM, Colab, TPU_NAME)."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise RmibError(
            f"strategy tpu: no TPU found ({_first_line(exc)}); run on a TPU VM or set "
            "TPU_NAME, or choose --strategy auto"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


# One entry per `--strategy` name (rmib.config.STRATEGIES); "auto" picks one of
# them in `_auto_strategy`.
_STRATEGY_BUILDERS: dict[str, Callable[[], tf.distribute.Strategy]] = {
    "default": _default_strategy,
    "mirrored": _mirrored_strategy,
    "multiworker": _multiworker_strategy,
    "tpu": _tpu_strategy,
}


def _auto_strategy() -> str:
    return "mirrored" if len(visible_gpus()) > 1 else "default"


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for a `--strategy` value.

    "auto" is MirroredStrategy when several GPUs are visible and the default
    (single-device) strategy otherwise; "mirrored" asks for MirroredStrategy
    over all visible devices; "multiworker" for MultiWorkerMirroredStrategy
    over the machines listed in the TF_CONFIG environment variable (one
    process per machine; `fit` then trains with its own distributed loop);
    "tpu" for TPUStrategy on the TPU found by TPUClusterResolver.

    Raises:
        RmibError: unknown name, listing the valid ones; "multiworker"
            without a valid TF_CONFIG; "tpu" when no TPU is found.
    """
    if name not in STRATEGIES:
        raise RmibError(f"unknown strategy {name!r}; valid values are: {', '.join(STRATEGIES)}")
    if name == "auto":
        name = _auto_strategy()
    if name not in _ONE_PER_PROCESS:
        return _STRATEGY_BUILDERS[name]()
    if name not in _strategies:
        try:
            _strategies[name] = _STRATEGY_BUILDERS[name]()
        except RuntimeError as exc:
            if "startup" not in str(exc):
                raise
            raise RmibError(
                f"strategy {name} must be created before TensorFlow runs anything: call "
                f"rmib.training.get_strategy({name!r}) first thing (the rmib commands do)"
            ) from None
    return _strategies[name]


# Cluster strategies configure the TensorFlow runtime: one instance per process.
_ONE_PER_PROCESS = ("multiworker", "tpu")
_strategies: dict[str, tf.distribute.Strategy] = {}


def is_chief(strategy) -> bool:
    """True unless `strategy` spans several workers and this process is not the chief.

    The chief is the "chief" task, or worker 0 when TF_CONFIG names no chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and int(resolver.task_id) == 0


def global_batch_size(config: TrainConfig, strategy=None) -> int:
    """The examples of one training step over all replicas: `config.batch_size` x replicas.

    `batch_size` (`--batch-size`) is the batch of one replica (one GPU, one
    TPU core, one worker); with one replica both are the same. Datasets given
    to `fit` are batched by this global size, and a run's steps per epoch are
    counted in global batches, so an epoch holds the same examples however
    many replicas share it.

    Args:
        config: the `TrainConfig`.
        strategy: the `tf.distribute` strategy; default `get_strategy(config.strategy)`.
    """
    strategy = strategy if strategy is not None else get_strategy(config.strategy)
    return int(config.batch_size) * int(strategy.num_replicas_in_sync)


def worker_run_directory(run: RunDirectory, strategy) -> RunDirectory:
    """The run directory this process writes: `run` itself on the chief, and
    `run/workers/<task>_<index>/` on the other workers of a multi-worker strategy."""
    if is_chief(strategy):
        return run
    resolver = strategy.cluster_resolver
    return RunDirectory(
        run.path / RunDirectory.WORKERS / f"{resolver.task_type}_{resolver.task_id}"
    )


def distribute_dataset(strategy, dataset: tf.data.Dataset):
    """`dataset` (batched by the global batch size) split over the strategy's replicas.

    Sharding is set explicitly to `AutoShardPolicy.DATA`: every worker reads
    the same (seeded) stream and keeps its own part of each global batch, so
    together the workers see each example once per epoch and the steps stay
    in lock step. (The default, FILE, would fail on rmib's generator-backed
    datasets, which read no files through tf.data.)
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


# --------------------------------------------------------------------------- optimizer


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
class CoupledDecayAdam(_CoupledWeightDecay, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with coupled weight decay (L2 in the gradient, as
    PyTorch's `Adam(weight_decay=...)`); see `CoupledDecaySGD`."""


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int | None = None):
    """The optimizer and learning-rate schedule of a `TrainConfig`.

    Adam, or SGD with `cfg.momentum`; `cfg.weight_decay` > 0 adds weight decay,
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
        adam = CoupledDecayAdam if coupled else keras.optimizers.Adam
        optimizer = adam(learning_rate=learning_rate, **decay)
    elif cfg.optimizer == "sgd":
        sgd = CoupledDecaySGD if coupled else keras.optimizers.SGD
        optimizer = sgd(learning_rate=learning_rate, momentum=cfg.momentum, **decay)
    else:  # TrainConfig validates the name; this guards hand-made objects
        raise RmibError(f"unknown optimizer {cfg.optimizer!r}; valid values are: adam, sgd")
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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


# --------------------------------------------------------------------------- data helpers


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


# --------------------------------------------------------------------------- metadata


class _RunMetadata(KerasSaveable):
    """Carries rmib's metadata dict into a `.keras` archive as a Keras asset."""

    def __init__(self, metadata: dict):
        self.metadata = dict(metadata)

    def _obj_type(self):
        return "Operation"  # one of the kinds Keras' saving code knows; has no state

    def save_assets(self, dir_path):
        with open(Path(dir_path) / "rmib.json", "w", encoding="utf-8") as f:
            f.write(_to_json(self.metadata))

    def load_assets(self, dir_path):
        pass


def attach_metadata(model, metadata: dict) -> None:
    """Attach `metadata` to `model`, so that saving it embeds the dict in the `.keras` file."""
    object.__setattr__(model, METADATA_ATTRIBUTE, _RunMetadata(metadata))


def model_metadata(model) -> dict:
    """The metadata attached to (or loaded with) a model; {} when it has none."""
    holder = getattr(model, METADATA_ATTRIBUTE, None)
    return dict(holder.metadata) if isinstance(holder, _RunMetadata) else {}


def _embedded_metadata(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ASSET not in archive.namelist():
                return {}
            text = archive.read(METADATA_ASSET).decode("utf-8")
    except (zipfile.BadZipFile, OSError) as exc:
        raise RmibError(f"{path}: not a readable .keras model file ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RmibError(f"{path}: its embedded rmib metadata is not valid JSON ({exc})") from None


def read_run_metadata(path) -> dict:
    """The rmib metadata of a run directory (its `rmib.json`) or of a `.keras` file.

    Args:
        path: a run directory, or a `.keras` file saved by rmib (anywhere: the
            metadata travels inside the file).

    Returns:
        The metadata dict; {} for a `.keras` file rmib did not save.

    Raises:
        RmibError: missing path, a directory that is no run directory, or a
            corrupt file.
    """
    path = Path(path)
    if path.is_dir():
        run = RunDirectory(path, create=False)
        if run.metadata_path.is_file():
            return run.read_metadata()
        if run.model_path.is_file():
            return _embedded_metadata(run.model_path)
        raise RmibError(f"{path}: not an rmib run directory (it has no rmib.json or model.keras)")
    if not path.is_file():
        raise RmibError(f"{path}: no such file or directory")
    return _embedded_metadata(path)


# --------------------------------------------------------------------------- loading


def _register_rmib_objects() -> None:
    """Import the rmib modules that register layers, losses and metrics for loading."""
    for name in ("rmib.models", "rmib.losses", "rmib.metrics", "rmib.grading", "rmib.tasks"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def _model_file(path: Path) -> Path:
    if path.is_dir():
        model = path / RunDirectory.MODEL
        if model.is_file():
            return model
        best = path / RunDirectory.CHECKPOINTS / "best.keras"
        hint = f"; its best checkpoint is {best}" if best.is_file() else ""
        raise RmibError(
            f"{path}: the run directory has no {RunDirectory.MODEL} (unfinished?){hint}"
        )
    if not path.is_file():
        raise RmibError(f"{path}: no such model file or run directory")
    return path


def load_model(path, unsafe: bool = False, compile: bool = False):
    """Load a model from a run directory (its `model.keras`) or a `.keras` file.

    The rmib metadata in the file is attached to the model again
    (`model_metadata(model)`), so saving it once more keeps it.

    Args:
        path: a run directory or a `.keras` file.
        unsafe: allow deserializing Python code (e.g. a Lambda layer); only
            for files from a trusted source (`--unsafe-load`).
        compile: also restore the loss, metrics and optimizer.

    Raises:
        RmibError: missing or corrupt file, a model needing unsafe loading
            without `unsafe`, or one Keras cannot rebuild.
    """
    path = Path(path)
    file = _model_file(path)
    metadata = _embedded_metadata(file) if file.suffix == ".keras" else {}
    _register_rmib_objects()
    try:
        model = keras.saving.load_model(file, compile=compile, safe_mode=not unsafe)
    except ValueError as exc:
        if "safe_mode" in str(exc):
            raise RmibError(
                f"{file}: the model contains Python code (e.g. a Lambda layer) that would run "
                "while loading it; load it only if you trust where it came from, with "
                "--unsafe-load"
            ) from None
        raise RmibError(f"{file}: cannot load the model: {_first_line(exc)}") from None
    except Exception as exc:  # Keras raises many types for corrupt archives
        raise RmibError(
            f"{file}: not a readable .keras model ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if metadata:
        attach_metadata(model, metadata)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- run directory


class RunDirectory:
    """The files of one training run (see the module docstring for the layout).

    Args:
        path: the directory; created (with `checkpoints/`) unless `create=False`.

    Raises:
        RmibError: `path` exists and is not a directory.
    """

    CONFIG = "config.toml"
    METADATA = "rmib.json"
    METRICS = "metrics.json"
    MODEL = "model.keras"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    WORKERS = "workers"

    def __init__(self, path, create: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RmibError(f"{self.path}: exists and is not a directory (a run directory)")
        if create:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self):
        return f"RunDirectory({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metadata_path(self) -> Path:
        return self.path / self.METADATA

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def model_path(self) -> Path:
        return self.path / self.MODEL

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    def history_path(self, phase: str | None = None) -> Path:
        return self.path / _phased("history", phase, ".csv")

    def checkpoint_path(self, kind: str, phase: str | None = None) -> Path:
        """`checkpoints/last.keras` or `checkpoints/best.keras` (`last_<phase>.keras` ...)."""
        if kind not in ("last", "best"):
            raise ValueError(f"checkpoint kind must be 'last' or 'best', got {kind!r}")
        return self.checkpoints_dir / _phased(kind, phase, ".keras")

    def state_path(self, phase: str | None = None) -> Path:
        return self.checkpoints_dir / _phased("state", phase, ".json")

    def refuse_new_run_over_old(self, resume: bool) -> None:
        """Refuse to start a new run (no `resume`) where a run already is.

        Called before a command reads its data or writes anything, so that a
        refused command leaves the run directory, its `config.toml` included,
        as it was. `fit` checks the same for each phase.

        Raises:
            RmibError: the directory holds a checkpoint (`checkpoints/last*.keras`)
                or `model.keras`, and `resume` is False.
        """
        if resume or not self.path.is_dir():
            return
        found = sorted(self.checkpoints_dir.glob("last*.keras"))
        found += [self.model_path] if self.model_path.exists() else []
        if found:
            raise RmibError(
                f"{self.path} already holds a run ({found[0].name} exists); continue it with "
                "--resume, or choose another output directory"
            )

    def remove_temporary_files(self) -> list[Path]:
        """Delete the hidden temporary files that writes interrupted by a crash left here.

        Only names of `rmib.io`'s atomic writes are removed (e.g.
        `checkpoints/.last.k3x9a0q2.keras`); `workers/`, which other
        processes of a multi-worker run write, is left alone. Call it only
        when nothing writes the run (`fit` does on resume). Returns the paths removed.
        """
        return remove_atomic_temporaries(self.path, skip=[self.path / self.WORKERS])

    # -- config, metadata, metrics

    def write_config(self, config) -> None:
        """Write the resolved config (a config dataclass or a dict) as `config.toml`."""
        data = config if isinstance(config, dict) else config_to_dict(config)
        with atomic_write(self.config_path, "w", encoding="utf-8") as f:
            f.write(dump_toml(data))

    def write_metadata(self, metadata: dict) -> dict:
        """Merge `metadata` into `rmib.json`, adding the rmib and Keras versions and
        the creation time (kept from the first write); returns the full dict."""
        merged = self.read_metadata() if self.metadata_path.is_file() else {}
        merged.update(metadata)
        merged["rmib_version"] = rmib.__version__
        merged["keras_version"] = keras.__version__
        merged.setdefault("created", datetime.datetime.now().astimezone().isoformat("T", "seconds"))
        _write_json(self.metadata_path, merged)
        return merged

    def read_metadata(self) -> dict:
        return _read_json(self.metadata_path)

    def update_metrics(self, metrics: dict) -> dict:
        """Merge `metrics` (top-level keys) into `metrics.json`; returns the full dict."""
        merged = self.read_metrics()
        merged.update(metrics)
        _write_json(self.metrics_path, merged)
        return merged

    def read_metrics(self) -> dict:
        return _read_json(self.metrics_path) if self.metrics_path.is_file() else {}

    # -- checkpoint state and history

    def read_state(self, phase: str | None = None) -> dict | None:
        path = self.state_path(phase)
        return _read_json(path) if path.is_file() else None

    def write_state(self, state: dict, phase: str | None = None) -> None:
        _write_json(self.state_path(phase), state)

    def read_history(self, phase: str | None = None) -> list[dict]:
        """The rows of the history CSV (epoch as int, values as float); [] when absent."""
        path = self.history_path(phase)
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return [
                {k: _parse_cell(k, v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)
            ]

    def write_history(self, rows: list[dict], phase: str | None = None) -> None:
        """Rewrite the history CSV atomically with `rows` (columns: epoch, then by first use)."""
        columns = ["epoch"]
        for row in rows:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format_cell(row.get(k)) for k in columns})
        with atomic_write(self.history_path(phase), "w", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())

    # -- models

    def save_model(self, model, path=None, metadata: dict | None = None) -> Path:
        """Save `model` atomically (default: `model.keras`) with the metadata embedded.

        Args:
            model: a Keras model whose layers, losses and metrics are serializable.
            path: where to save; default `model.keras` in the run directory.
            metadata: the dict to embed; default the run's `rmib.json`.

        Raises:
            ValueError: the model (or its compiled loss or metrics) cannot be
                serialized, e.g. an unregistered custom object or a
                `functools.partial` loss.
        """
        path = Path(path) if path is not None else self.model_path
        if metadata is None:
            metadata = self.read_metadata() if self.metadata_path.is_file() else {}
        attach_metadata(model, metadata)
        try:
            with atomic_path(path) as tmp:
                model.save(tmp)
        except TypeError as exc:
            raise ValueError(
                f"cannot save the model to {path}: {_first_line(exc)} Every layer, loss and "
                "metric must be serializable: a Keras class with get_config, or a function "
                "registered with keras.saving.register_keras_serializable(package='rmib')"
            ) from exc
        return path


def _phased(stem: str, phase: str | None, suffix: str) -> str:
    return f"{stem}{suffix}" if phase is None else f"{stem}_{phase}{suffix}"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _to_json(data) -> str:
    return json.dumps(_finite_or_none(data), indent=2, sort_keys=False, default=str) + "\n"


def _write_json(path: Path, data) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(_to_json(data))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RmibError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RmibError(f"{path}: not valid JSON ({exc})") from None


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_cell(column: str, text: str):
    if column == "epoch":
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------- fit


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
    earlier invocations of the run spent (`previous`, from the state). At the
    end of each epoch it sets `model.stop_training` when the time spent plus
    the mean epoch so far exceeds the limit; it runs before the validation
    callbacks, so they see that the epoch is the last and validate it.
    """

    def __init__(self, limit_minutes: float, previous: float = 0.0):
        super().__init__()
        self.limit = 60.0 * float(limit_minutes)
        self.previous = float(previous)
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
        if self.limit > 0 and self.seconds + mean > self.limit:
            self.reached = True
            self.model.stop_training = True


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


def _is_arrays(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) in (2, 3) and hasattr(data[0], "shape")


def _steps(data, batch_size: int) -> int | None:
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        return cardinality if cardinality > 0 else None
    if _is_arrays(data):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data) or None
    except TypeError:
        return None


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


_finished = run_finished


def _say(message: str, verbose) -> None:
    if verbose:
        print(f"rmib: {message}", flush=True)


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
    allow_slow: bool = False,
    unsafe_load: bool = False,
    verbose=1,
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
        allow_slow: accept mixed_float16 on a CPU (tests only).
        unsafe_load: allow Lambda layers when reloading a checkpoint.
        verbose: Keras verbosity (0 silent, 1 progress bar, 2 one line per epoch).

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
    if _finished(state, cfg):
        _say(
            f"{run.path}{_phase_text(phase)} already finished at epoch {state['epoch']}; "
            "nothing to train",
            verbose,
        )
        return _finished_run(run, cfg, phase, run_metadata, compile_args, save_final, unsafe_load)

    initial_epoch = int(state.get("epoch", 0))
    set_seed(cfg.seed + initial_epoch, cfg.deterministic)
    if class_weight is None and cfg.class_weights:
        if not _is_arrays(train_data):
            raise ValueError(
                "config.class_weights is on: pass class_weight=class_weights_from_labels(labels)"
            )
        class_weight = class_weights_from_labels(train_data[1])
    steps = steps_per_epoch or cfg.steps_per_epoch or _steps(train_data, batch_size)

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
    clock = _TimeLimit(cfg.time_limit, state.get("train_seconds") or 0.0)
    checkpoint = _RunCheckpoint(
        run, cfg, phase, state, history, run_metadata, plateau[0] if plateau else None, clock
    )
    callbacks = [_StopOnNonFiniteLoss(), clock, *validation_callbacks, *plateau, checkpoint]
    if cfg.tensorboard:
        log_dir = run.tensorboard_dir / phase if phase else run.tensorboard_dir
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, profile_batch=0)
        )
    callbacks.extend(extra_callbacks)

    try:
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            _distributed_fit(
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
                verbose=verbose,
            )
        else:
            model.fit(
                **_data_arguments(train_data, batch_size),
                validation_data=tuple(val_data) if _is_arrays(val_data) else val_data,
                epochs=cfg.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch or cfg.steps_per_epoch,
                validation_steps=validation_steps or cfg.validation_steps,
                class_weight=class_weight,
                callbacks=callbacks,
                verbose=verbose,
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

    if not _finished(state, cfg):
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


def _metrics_in_scope(metrics):
    """Fresh copies (from their configs) of the metric objects in `metrics`."""
    if isinstance(metrics, keras.metrics.Metric):
        return type(metrics).from_config(metrics.get_config())
    if isinstance(metrics, dict):
        return {k: _metrics_in_scope(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(_metrics_in_scope(m) for m in metrics)
    return metrics  # names and functions: Keras builds them in the scope


def _as_dataset(data, batch_size: int) -> tf.data.Dataset:
    if isinstance(data, tf.data.Dataset):
        return data
    if _is_arrays(data):
        return tf.data.Dataset.from_tensor_slices(tuple(data)).batch(batch_size)
    raise RmibError("strategy multiworker needs a tf.data.Dataset or arrays as training data")


def _distributed_fit(
    model,
    strategy,
    train_data,
    val_data,
    *,
    cfg: TrainConfig,
    batch_size: int,
    initial_epoch: int,
    steps_per_epoch,
    validation_steps,
    class_weight,
    callbacks,
    verbose,
) -> None:
    """`model.fit` for MultiWorkerMirroredStrategy, where Keras 3's own fit fails
    (keras-team/keras#20585): each step runs the compiled model's `train_step`
    through `strategy.run` (the optimizer all-reduces the gradients), and the
    same callbacks see the same logs as under `model.fit`. At the end of every
    epoch, before validation and the callbacks, the moving statistics of the
    batch-norm layers are averaged over the replicas
    (`_average_batch_norm_statistics`), so every worker validates and saves
    the same model.

    Every worker must run the same number of steps, so the steps per epoch must
    be known (given, or the dataset's cardinality). Arrays are batched in order,
    without shuffling.
    """
    if class_weight:
        raise RmibError(
            "class weights are not supported with strategy multiworker; turn class_weights off"
        )
    train = _as_dataset(train_data, batch_size)
    steps = steps_per_epoch or _steps(train, batch_size)
    if not steps:
        raise RmibError(
            "strategy multiworker needs the number of steps per epoch (set steps_per_epoch): "
            "every worker must run the same number of steps"
        )
    # As model.fit does: build the compiled metrics in the strategy's scope now;
    # built lazily inside strategy.run, their variables would stay per worker.
    with strategy.scope():
        model._symbolic_build(data_batch=next(iter(train)))
    train_batches = distribute_dataset(strategy, train)
    val_batches = None
    if val_data is not None:
        val = _as_dataset(val_data, batch_size)
        if validation_steps:
            val = val.take(validation_steps)
        val_batches = distribute_dataset(strategy, val)

    def reduced(logs):
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

    @tf.function
    def train_step(iterator):
        return reduced(strategy.run(model.train_step, args=(next(iterator),)))

    @tf.function
    def test_step(batch):
        strategy.run(model.test_step, args=(batch,))

    @tf.function
    def metrics_result():
        # Metric variables sync on read: read here, across replicas, they hold the
        # sums over every worker, so AUC, RMSE ... are those of the global data
        # (a mean of per-worker results would not be).
        return model.get_metrics_result()

    def epoch_metrics(prefix=""):
        with strategy.scope():
            return {f"{prefix}{k}": float(v) for k, v in metrics_result().items()}

    average_statistics = _average_batch_norm_statistics(model, strategy)

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=False,
        add_progbar=bool(verbose),
        model=model,
        verbose=verbose,
        epochs=cfg.epochs,
        steps=steps,
    )
    model.stop_training = False
    # With explicit steps the dataset runs on across epochs (rmib's seeded
    # pipelines hold every epoch back to back); else each epoch is one pass.
    iterator = iter(train_batches) if steps_per_epoch else None
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, cfg.epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        epoch_iterator = iterator if iterator is not None else iter(train_batches)
        logs = {}
        for step in range(steps):
            callback_list.on_train_batch_begin(step)
            logs = train_step(epoch_iterator)
            callback_list.on_train_batch_end(step, logs)
        average_statistics()
        epoch_logs = epoch_metrics()
        if val_batches is not None:
            model.reset_metrics()
            for batch in val_batches:
                test_step(batch)
            epoch_logs.update(epoch_metrics("val_"))
        callback_list.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callback_list.on_train_end()


def _batch_norm_statistics(model) -> list:
    """The moving mean and variance of every batch-norm layer of `model` that trains."""
    statistics = []
    # Keras' own walk over nested layers (models, and layers inside custom layers).
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and layer.built:
            statistics += [layer.moving_mean, layer.moving_variance]
    return statistics


def _average_batch_norm_statistics(model, strategy) -> Callable[[], None]:
    """A function that sets every replica's batch-norm moving statistics to their mean.

    Keras 3 creates them with aggregation "none", so under
    MultiWorkerMirroredStrategy each worker updates its own copy from its own
    shard of every batch. The moving updates are linear, so averaging the
    copies at every epoch end gives what one copy fed the replicas' mean batch
    statistics would hold, as tf.keras 2's batch norm (variables synchronized
    on read with MEAN) did. Frozen layers keep their statistics and are left out.
    """
    statistics = _batch_norm_statistics(model)
    if not statistics:
        return lambda: None

    def replace_by_mean():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce("MEAN", [tf.identity(v.value) for v in statistics])
        for variable, mean in zip(statistics, means, strict=True):
            variable.assign(mean)  # aggregation "none": each replica sets its own copy

    @tf.function
    def average():
        strategy.run(replace_by_mean)

    return average


def _saved_state(run: RunDirectory, cfg: TrainConfig, phase, verbose) -> dict:
    """The state of the last checkpoint (the copy inside last.keras is authoritative)."""
    last_path = run.checkpoint_path("last", phase)
    if not last_path.is_file():
        _say(f"nothing to resume in {run.checkpoints_dir}; starting at epoch 1", verbose)
        return {}
    state = _embedded_metadata(last_path).get("checkpoint") or run.read_state(phase) or {}
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
    if not _is_arrays(train_data):
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
            f"the loss and metrics must be serializable to be checkpointed: {_first_line(exc)}"
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
