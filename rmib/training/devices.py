"""Where and in what precision training runs: dtype policies and distribution strategies.

Precision of training (`resolve_precision`, `apply_precision`): "auto" is
mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bfloat16 maths,
float32 otherwise.

Precision of prediction: a model trained under
``mixed_bfloat16`` or ``mixed_float16`` keeps float32 variables; only its
compute dtype is reduced. So one trained model can predict in any precision:
`with_precision` switches the compute dtype of its layers in place (no weight
changes), keeping float32 in the layers that must stay float32 whatever the
policy: the layers that produce the model's outputs (the sigmoid or softmax
heads, so that probabilities, losses and metrics are float32) and the layers
that pin float32 themselves (`rmib.models.layers` input normalisation).

Prediction and export default to float32 (`PREDICT_DEFAULT`): on a bfloat16
CPU a VGG16-CBAM encoder-decoder trained with ``auto`` scored AP 0.285 on a
real IDRiD crop predicted in float32 and 0.213 in mixed_bfloat16 (issue 15),
and a float32 SavedModel serves on every CPU, GPU and TFLite runtime.
``--precision auto`` predicts in the machine's fast precision instead.
`check_tolerance` is the largest difference `rmib export --check` accepts
between an export and rmib's own prediction computed in the same precision.

Distribution (`get_strategy`, `is_chief`, `global_batch_size`,
`distribute_dataset`): one `tf.distribute` strategy per `--strategy` value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from rmib.choices import PREDICT_PRECISIONS
from rmib.config import PRECISIONS, STRATEGIES, TrainConfig
from rmib.errors import RmibError, first_line

CPUINFO = Path("/proc/cpuinfo")
# x86 flags of CPUs with native bfloat16 maths (Intel AMX, AVX512-BF16 on
# Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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
            f"strategy tpu: no TPU found ({first_line(exc)}); run on a TPU VM or set "
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


# --------------------------------------------------------------------------- prediction precision

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
    if name not in PREDICT_PRECISIONS:
        raise RmibError(
            f"unknown precision {name!r}; valid values are: {', '.join(PREDICT_PRECISIONS)}"
        )
    if name == "training":
        resolved = trained if trained in SIGNIFICAND_BITS else "float32"
        reason = f"the precision the model was trained in ({trained or 'not recorded'})"
        if resolved == "mixed_float16" and not visible_gpus() and not allow_slow:
            raise RmibError(
                "the model was trained in mixed_float16, which needs a GPU to predict; "
                "no GPU is visible: use --precision float32 or auto"
            )
        return resolved, reason
    resolved = resolve_precision(name, allow_slow=allow_slow)
    if name == "float32":
        return resolved, "asked for (--precision float32, the default for prediction)"
    return resolved, precision_reason(name, resolved)
