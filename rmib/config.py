"""Dataclass configs, loaded from TOML and overridable by command-line flags.

One small mechanism serves every command: a config is a dataclass whose
fields are plain values (str, int, float, bool, a `Literal` of choices,
optional values, lists) or nested config dataclasses, which appear in TOML as
sections (`[train]`, `[data]`, `[model]`). `load_config` reads a TOML file,
refuses unknown keys, checks and converts every value, then applies flag
overrides; `dump_config` writes a resolved config back (the run directory's
`config.toml`) with `rmib.tomlfile.dump_toml`.

Example:
    >>> cfg = load_config(TrainConfig, "recipe.toml", {"epochs": 5, "batch_size": None})
    >>> cfg.epochs
    5
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from rmib.choices import (
    LR_SCHEDULES,
    MONITOR_MODES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    WEIGHT_DECAY_MODES,
)
from rmib.errors import RmibError
from rmib.tomlfile import dump_toml, read_toml

_FLAG_SOURCE = "the command line"


@dataclasses.dataclass
class TrainConfig:
    """How to train: the settings every training command shares (section `[train]`).

    Attributes:
        epochs: number of passes over the training data.
        batch_size: images per step and replica; a step under a distribution
            strategy takes batch_size x replicas (`rmib.training.global_batch_size`).
        optimizer: "adam" or "sgd" (SGD with `momentum`).
        learning_rate: initial learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: weight decay factor (Dual2Net's recipe: SGD with 5e-4); 0
            turns it off. How it is applied is `weight_decay_mode`.
        weight_decay_mode: "decoupled" (Keras' `weight_decay`: w -= lr * wd * w
            beside the update) or "coupled" (PyTorch SGD's and the papers': wd * w
            is added to the gradient, so with SGD it goes through the momentum;
            at steady state that decays about 1 / (1 - momentum) = 10x more per
            step at momentum 0.9, and with Adam it is rescaled like the gradient).
        lr_schedule: "constant"; "poly" (polynomial decay to 0 over all steps,
            power `poly_power`); "plateau" (multiply by `plateau_factor` after
            `plateau_patience` epochs without improvement of `monitor`).
        poly_power: exponent of the polynomial decay (0.9 in the papers).
        plateau_patience: epochs without improvement before the rate is cut.
        plateau_factor: factor the rate is multiplied by on a plateau.
        early_stopping_patience: stop after this many epochs without
            improvement of `monitor`; 0 turns early stopping off.
        time_limit: minutes of training (summed over `--resume`s and over the
            phases of phased methods); the run stops after the first epoch past which
            another epoch, as long as the mean epoch so far, would not fit.
            0 = no limit. For comparisons at equal wall-clock time.
        restore_best: end with the weights of the best epoch (by `monitor`)
            rather than those of the last one.
        monitor: the logged quantity that decides the best epoch, e.g.
            "val_loss" or "val_auc".
        monitor_mode: "min", "max", or "auto" (min for names containing
            "loss" or "error", max otherwise).
        precision: "auto", "float32", "mixed_float16" or "mixed_bfloat16"
            (see `rmib.training.resolve_precision`).
        strategy: "auto", "default", "mirrored", "multiworker" (machines listed in
            TF_CONFIG) or "tpu" (see `rmib.training.get_strategy`).
        seed: seed for Python, NumPy and TensorFlow random numbers.
        deterministic: also make TensorFlow ops deterministic (slower).
        class_weights: weight the loss by inverse class frequency ("balanced").
        steps_per_epoch: training steps per epoch; None = one pass over the data.
        validation_steps: validation steps per epoch; None = the whole validation set.
        tensorboard: write TensorBoard logs to the run directory.
    """

    epochs: int = 10
    batch_size: int = 8
    optimizer: Literal[OPTIMIZERS] = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_mode: Literal[WEIGHT_DECAY_MODES] = "decoupled"
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    poly_power: float = 0.9
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    early_stopping_patience: int = 0
    time_limit: float = 0.0
    restore_best: bool = True
    monitor: str = "val_loss"
    monitor_mode: Literal[MONITOR_MODES] = "auto"
    precision: Literal[PRECISIONS] = "auto"
    strategy: Literal[STRATEGIES] = "auto"
    seed: int = 42
    deterministic: bool = False
    class_weights: bool = False
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    tensorboard: bool = True

    def __post_init__(self):
        check_fields(self)
        require(self, "epochs", self.epochs >= 1, "at least 1")
        require(self, "batch_size", self.batch_size >= 1, "at least 1")
        require(self, "learning_rate", self.learning_rate > 0, "positive")
        require(self, "momentum", 0 <= self.momentum < 1, "in [0, 1)")
        require(self, "weight_decay", self.weight_decay >= 0, "zero or positive")
        require(self, "poly_power", self.poly_power > 0, "positive")
        require(self, "plateau_patience", self.plateau_patience >= 1, "at least 1")
        require(self, "plateau_factor", 0 < self.plateau_factor < 1, "in (0, 1)")
        require(self, "early_stopping_patience", self.early_stopping_patience >= 0, ">= 0")
        require(self, "time_limit", self.time_limit >= 0, "zero (no limit) or positive minutes")
        require(self, "monitor", bool(self.monitor.strip()), "a logged metric name")
        for name in ("steps_per_epoch", "validation_steps"):
            value = getattr(self, name)
            require(self, name, value is None or value >= 1, "at least 1 (or unset)")

    @property
    def resolved_monitor_mode(self) -> str:
        """ "min" or "max": `monitor_mode`, with "auto" decided from the monitor's name."""
        if self.monitor_mode != "auto":
            return self.monitor_mode
        name = self.monitor.lower()
        return "min" if ("loss" in name or "error" in name) else "max"


def require(config, name: str, ok: bool, expected: str) -> None:
    """Raise a user error for a field out of range (load_config adds where it came from)."""
    if not ok:
        raise RmibError(f"{name} must be {expected}, got {getattr(config, name)!r}")


def check_fields(config) -> None:
    """Check and convert every field of a config built directly in Python."""
    hints = _type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        object.__setattr__(
            config, field.name, _coerce(value, hints[field.name], field.name, source=None)
        )


# --------------------------------------------------------------------------- loading


def load_config(cls, path=None, overrides: dict | None = None):
    """Build a config dataclass from an optional TOML file and flag overrides.

    Args:
        cls: a config dataclass (fields may be nested config dataclasses,
            which are TOML sections).
        path: a TOML file, or None for the defaults.
        overrides: values from flags; None values are ignored (so click options
            default to None and only the flags given override). A key is a
            field name, a dotted path ("train.epochs"), or the name of a field
            of exactly one nested section ("epochs" for "train.epochs").

    Returns:
        An instance of `cls`.

    Raises:
        RmibError: unreadable TOML, unknown key (the message lists the valid
            ones), or a value of the wrong type or out of range; each names the
            file (or the command line) and the key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    data: dict = {}
    source = _FLAG_SOURCE
    if path is not None:
        path = Path(path)
        source = str(path)
        data = read_toml(path)
    # Check the file on its own first, so its errors name the file.
    _from_dict(cls, data, source, prefix="")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(data, _resolve_override_key(cls, key), value)
    return _from_dict(cls, data, _FLAG_SOURCE if overrides else source, prefix="")


def config_to_dict(config) -> dict:
    """A config dataclass as a plain dict (nested sections as dicts; None values dropped)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return clean(dataclasses.asdict(config))


def dump_config(config) -> str:
    """A config dataclass as TOML text that `load_config` reads back to an equal config."""
    return dump_toml(config_to_dict(config))


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _nested_configs(cls) -> dict[str, type]:
    hints = _type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def _resolve_override_key(cls, key: str) -> str:
    names = {f.name for f in dataclasses.fields(cls)}
    head = key.split(".", 1)[0]
    if head in names:
        return key
    owners = [s for s, sub in _nested_configs(cls).items() if _has_key(sub, key)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if not owners:
        raise ValueError(f"override {key!r} is not a field of {cls.__name__}")
    raise ValueError(f"override {key!r} is ambiguous in {cls.__name__}: sections {owners}")


def _has_key(cls, key: str) -> bool:
    try:
        _resolve_override_key(cls, key)
    except ValueError:
        return False
    return True


def _set_dotted(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            data[part] = child = {}
        data = child
    data[last] = value


def _from_dict(cls, data, source: str | None, prefix: str):
    if not isinstance(data, dict):
        raise RmibError(_where(source, f"[{prefix.rstrip('.')}] must be a section (a table)"))
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        valid = ", ".join(sorted(fields))
        where = f" in [{prefix.rstrip('.')}]" if prefix else ""
        message = f"unknown key {prefix + unknown[0]!r}{where}; valid keys are: {valid}"
        raise RmibError(_where(source, message))
    values = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            # A nested section starts from its field's own default (e.g. the
            # segment command's [train] monitors val_aupr), not the class's.
            default = factory()
            if dataclasses.is_dataclass(default):
                value = {**config_to_dict(default), **value}
        values[name] = _coerce(value, hints[name], prefix + name, source)
    try:
        return cls(**values)
    except RmibError as exc:
        raise RmibError(_where(source, f"{prefix}{exc}")) from None


def _where(source: str | None, message: str) -> str:
    if source is None:
        return message
    if source == _FLAG_SOURCE:
        return f"{message} (given on {_FLAG_SOURCE})"
    return f"{source}: {message}"


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, source: str | None):
    """Check `value` against the type `tp`, converting where unambiguous."""

    def fail(expected: str | None = None):
        message = f"{key} must be {expected or _describe(tp)}, got {value!r}"
        raise RmibError(_where(source, message))

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise message
            return _coerce(value, options[0], key, source)
        for arg in options:
            try:
                return _coerce(value, arg, key, source)
            except RmibError:
                pass
        fail()
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            fail()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail(f"a list of {len(args)} values")
            items = [
                _coerce(v, a, f"{key}[{i}]", source)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a table")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(f"a section [{key}]")
        return _from_dict(tp, value, source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        fail()
    if tp is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            fail("a path")
        return Path(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            fail()
        return value
    return value


_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


__all__ = [
    "LR_SCHEDULES",
    "MONITOR_MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "STRATEGIES",
    "WEIGHT_DECAY_MODES",
    "TrainConfig",
    "check_fields",
    "config_to_dict",
    "dump_config",
    "dump_toml",
    "load_config",
    "read_toml",
    "require",
]
