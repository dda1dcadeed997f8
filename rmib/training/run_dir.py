"""The run directory on disk, the metadata inside `.keras` files, and loading models.

Run directory (one per training command, see DESIGN.md "Runs and models on disk"):

    config.toml            the resolved config
    rmib.json              task, lesion, backbone, preprocessing, sizes, precision,
                           rmib version, creation time
    history.csv            one row per epoch (history_<phase>.csv for phased methods)
    history.png            loss and validation values per epoch, one panel each,
                           redrawn after every epoch
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
import datetime
import io
import json
import math
import zipfile
from pathlib import Path

import keras

# Keras has no public base class for objects that save assets; this one is
# what its own saving code walks. tests/test_training.py guards the behaviour.
from keras.src.saving.keras_saveable import KerasSaveable

import rmib
from rmib.config import config_to_dict, dump_toml
from rmib.errors import RmibError, first_line
from rmib.io import atomic_path, atomic_write, remove_atomic_temporaries
from rmib.registration import register_custom_objects
from rmib.report import save_history_plot
from rmib.training.devices import is_chief

METADATA_ATTRIBUTE = "rmib_metadata"
METADATA_ASSET = f"assets/{METADATA_ATTRIBUTE}/rmib.json"


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
    register_custom_objects()
    try:
        model = keras.saving.load_model(file, compile=compile, safe_mode=not unsafe)
    except ValueError as exc:
        if "safe_mode" in str(exc):
            raise RmibError(
                f"{file}: the model contains Python code (e.g. a Lambda layer) that would run "
                "while loading it; load it only if you trust where it came from, with "
                "--unsafe-load"
            ) from None
        reason = first_line(exc)
        if "could not be loaded" in reason:
            # Keras found layers whose saved weights do not fit: another architecture.
            reason = (
                f"{reason.rstrip(':')}; its layers differ from this rmib version's "
                "(CHANGELOG.md lists the changes older files do not survive): retrain it"
            )
        raise RmibError(f"{file}: cannot load the model: {reason}") from None
    except Exception as exc:  # Keras raises many types for corrupt archives
        raise RmibError(
            f"{file}: not a readable .keras model ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    if metadata:
        attach_metadata(model, metadata)
    return model


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
    HISTORY_PLOT = "history.png"
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

    @property
    def history_plot_path(self) -> Path:
        return self.path / self.HISTORY_PLOT

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
        self.write_history_plot()

    def write_history_plot(self) -> Path | None:
        """Redraw `history.png` from every history CSV of the run (one line per phase,
        phases in the order they were written); None before the first epoch."""
        files = sorted(self.path.glob("history*.csv"), key=lambda p: p.stat().st_mtime_ns)
        histories = {}
        for file in files:
            phase = file.stem[len("history_") :] if file.stem != "history" else None
            histories[phase] = self.read_history(phase)
        return save_history_plot(histories, self.history_plot_path)

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
                f"cannot save the model to {path}: {first_line(exc)} Every layer, loss and "
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


def worker_run_directory(run: RunDirectory, strategy) -> RunDirectory:
    """The run directory this process writes: `run` itself on the chief, and
    `run/workers/<task>_<index>/` on the other workers of a multi-worker strategy."""
    if is_chief(strategy):
        return run
    resolver = strategy.cluster_resolver
    return RunDirectory(
        run.path / RunDirectory.WORKERS / f"{resolver.task_type}_{resolver.task_id}"
    )


def checkpoint_state(run: RunDirectory, phase: str | None = None) -> dict:
    """The training state of a run's (phase's) last checkpoint; {} before the first epoch.

    The copy inside `checkpoints/last.keras` is authoritative (written in the
    same atomic rename as the weights); `state.json` mirrors it for people and
    tools and is read only for a checkpoint without one. Its "epoch" is the
    number of epochs done, i.e. the epoch a resumed run starts from.
    """
    last = run.checkpoint_path("last", phase)
    if not last.is_file():
        return {}
    return dict(_embedded_metadata(last).get("checkpoint") or run.read_state(phase) or {})


def dry_run_report(config, data_lines, out, resume: bool) -> str:
    """What a training command would do, for `--dry-run`: the resolved configuration
    (as its config.toml), the data found and the run directory; nothing is written.

    Args:
        config: the resolved config dataclass (or its dict).
        data_lines: lines describing the data found (images, splits, labels).
        out: the run directory.
        resume: whether the command was asked to continue the run.
    """
    data = config if isinstance(config, dict) else config_to_dict(config)
    run = RunDirectory(out, create=False)
    if not run.path.exists():
        where = "does not exist yet: it would be created"
    elif not any(run.path.iterdir()):
        where = "exists and is empty"
    else:
        done = sorted(p.name for p in run.checkpoints_dir.glob("last*.keras"))
        done += [run.MODEL] if run.model_path.is_file() else []
        where = f"holds a run ({', '.join(done)})" if done else "exists and holds no run"
        where += ": --resume would continue it" if done and resume else ""
    return "\n".join(
        [
            "dry run: nothing is read beyond the file lists and masks, nothing written",
            "",
            "# resolved configuration (config.toml)",
            dump_toml(data).rstrip(),
            "",
            "# data",
            *data_lines,
            "",
            f"# run directory\n{run.path}: {where}",
        ]
    )
