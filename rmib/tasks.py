"""Every method rmib trains, in one table, and the entry points that dispatch on it.

`METHODS` is the only place that knows every method: `rmib segment --model`,
`load_segmenter` / `make_segmenter` (the model type in a run's metadata) and
the custom Keras objects of every `.keras` file rmib writes (importing this
module imports every method, which registers them) all read it. A new method
adds a folder under `rmib/methods/` and one row here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import click
import numpy as np

from rmib import training
from rmib.config import config_to_dict
from rmib.errors import RmibError
from rmib.methods.classifier import train as classifier_train
from rmib.methods.classifier.config import PretrainConfig
from rmib.methods.dual2net import train as dual2net_train
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter
from rmib.methods.encoder_decoder import train as encoder_decoder_train
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter
from rmib.methods.encoders import describe_encoder
from rmib.methods.grading.config import GradeConfig
from rmib.methods.grading.grader import Grader
from rmib.methods.grading.train import train_grader
from rmib.methods.local_global import config as local_global_config
from rmib.methods.local_global import train as local_global_train
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter
from rmib.methods.segment_config import SEGMENT_MODELS, SegmentConfig
from rmib.methods.segment_data import lesion_records, split_records
from rmib.precision import with_precision


@dataclasses.dataclass(frozen=True)
class Method:
    """One method rmib trains.

    Attributes:
        name: its name (`rmib segment --model`, rmib.json "model").
        task: the command that trains it ("pretrain", "segment" or "grade").
        train: the training job; a segmenter's is
            `train(cfg, train_records, val_records, run, resume=...) -> metrics`.
        segmenter: the `rmib.inference.segmenter.Segmenter` class that predicts
            whole photographs with its model (segmenters only).
        check: `check(cfg)` refuses a configuration the model cannot take,
            before any data is read (or None).
    """

    name: str
    task: str
    train: Callable
    segmenter: type | None = None
    check: Callable | None = None


METHODS = {
    "classifier": Method("classifier", "pretrain", classifier_train.run_pretrain),
    "encoder-decoder": Method(
        "encoder-decoder",
        "segment",
        encoder_decoder_train.train,
        TiledSegmenter,
        encoder_decoder_train.check_config,
    ),
    "local-global": Method(
        "local-global",
        "segment",
        local_global_train.train,
        LocalGlobalSegmenter,
        local_global_config.resolve_sizes,
    ),
    "dual2net": Method("dual2net", "segment", dual2net_train.train, Dual2NetSegmenter),
    "grading": Method("grading", "grade", train_grader),
}
SEGMENT_METHODS = {name: m for name, m in METHODS.items() if m.task == "segment"}
assert tuple(SEGMENT_METHODS) == SEGMENT_MODELS, "SegmentConfig's models are the table's"


def check_segment_config(cfg: SegmentConfig) -> None:
    """Refuse what the chosen segmenter cannot take (e.g. a patch side), before any data is read.

    Raises:
        RmibError: naming the value and what was expected.
    """
    check = SEGMENT_METHODS[cfg.model].check
    if check is not None:
        check(cfg)


def run_segment(cfg: SegmentConfig, resume=False, echo=click.echo) -> dict:
    """Train the configured segmenter in `cfg.out`; returns the validation metrics."""
    training.RunDirectory(cfg.out, create=False).refuse_new_run_over_old(resume)
    check_segment_config(cfg)
    if cfg.model == "encoder-decoder":
        echo(describe_encoder(cfg) + (f"; working scale {cfg.scale:g}" if cfg.scale != 1 else ""))
    records = lesion_records(cfg.data, cfg.lesion, cfg.on_bad)
    train_records, val_records = split_records(records, cfg)
    if not train_records:
        raise RmibError("every annotated image is held out for validation: nothing to train on")
    run = training.RunDirectory(cfg.out)
    # Only the chief of a multi-worker run writes `--out` (the runner puts the
    # other workers' checkpoints under `workers/`).
    chief = training.is_chief(training.get_strategy(cfg.train.strategy))
    if chief:
        run.write_config(config_to_dict(cfg))
    echo(
        f"{cfg.model} for {cfg.lesion}: {len(train_records)} training and "
        f"{len(val_records)} validation images -> {run.path}"
    )
    result = SEGMENT_METHODS[cfg.model].train(cfg, train_records, val_records, run, resume=resume)
    result = {
        k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in result.items()
    }
    if result and chief:
        run.update_metrics({"validation": result})
        echo(
            "validation: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        )
    return result


def load_segmenter(
    model_path,
    *,
    unsafe=False,
    tile=None,
    overlap=None,
    batch_size=None,
    halo=None,
    max_tile=None,
    precision="float32",
    **overrides,
):
    """Load a run directory or `.keras` file as a Segmenter.

    Args:
        model_path: run directory or `.keras` file.
        unsafe: allow models that need Keras unsafe deserialization (Lambda layers).
        tile, overlap, batch_size, halo, max_tile: tiling overrides ("auto" or a side;
            see `TiledSegmenter`).
        precision: the policy to predict in: "float32" (the default, as
            `rmib predict`), "mixed_bfloat16" or "mixed_float16" (see
            `rmib.precision.resolve_predict_precision` for "auto"); None: the
            precision the model was trained in.
        **overrides: metadata overrides (e.g. lesion="HE").

    Raises:
        RmibError: the file is not an rmib segmentation model.
    """
    model = training.load_model(model_path, unsafe=unsafe)
    if precision is not None:
        with_precision(model, precision)
    metadata = training.read_run_metadata(model_path)
    metadata.update({k: v for k, v in overrides.items() if v is not None})
    if metadata.get("task") != "segment":
        raise RmibError(
            f"{model_path}: not a segmentation model (task {metadata.get('task')!r}); "
            "rmib predict and rmib evaluate take a run of `rmib segment`"
        )
    model_type = metadata.get("model", "encoder-decoder")
    if model_type not in SEGMENT_METHODS:
        raise RmibError(
            f"{model_path}: unknown segmentation model type {model_type!r} "
            f"(known: {', '.join(SEGMENT_METHODS)})"
        )
    return _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile)


def _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile):
    cls = SEGMENT_METHODS[model_type].segmenter
    if halo is None and max_tile is None:
        return cls(model, metadata, tile=tile, overlap=overlap, batch_size=batch_size)
    if cls is not TiledSegmenter:
        raise RmibError(
            f"--halo and --max-tile apply to encoder-decoder models, not to {model_type}"
        )
    return cls(
        model,
        metadata,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        halo=halo,
        max_tile=max_tile,
    )


def make_segmenter(
    model, metadata, *, tile=None, overlap=None, batch_size=None, halo=None, max_tile=None
):
    """The Segmenter of an already loaded model and its run metadata (as `load_segmenter`).

    Raises:
        RmibError: metadata of an unknown segmentation model type, or a bad tile.
    """
    model_type = dict(metadata or {}).get("model", "encoder-decoder")
    if model_type not in SEGMENT_METHODS:
        raise RmibError(
            f"unknown segmentation model type {model_type!r} (known: {', '.join(SEGMENT_METHODS)})"
        )
    return _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile)


def run_pretrain(cfg, resume=False, echo=click.echo) -> dict:
    """Train the stage-1 classifier (`rmib pretrain`); see `rmib.methods.classifier.train`."""
    return classifier_train.run_pretrain(cfg, resume=resume, echo=echo)


def load_grader(run_dir, *, batch_size: int = 256, unsafe: bool = False) -> Grader:
    """The grader of a `rmib grade train` run directory; see `Grader.load`.

    Raises:
        RmibError: not a run directory, not a grading run, or a model file missing.
    """
    return Grader.load(run_dir, batch_size=batch_size, unsafe=unsafe)


__all__ = [
    "METHODS",
    "GradeConfig",
    "PretrainConfig",
    "SegmentConfig",
    "Method",
    "SEGMENT_METHODS",
    "check_segment_config",
    "load_grader",
    "load_segmenter",
    "make_segmenter",
    "run_pretrain",
    "run_segment",
    "train_grader",
]
