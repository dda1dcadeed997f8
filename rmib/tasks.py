"""Every method rmib trains, in one table, and the entry points that dispatch on it.

`METHODS` is the only place that knows every method: `rmib segment --model`,
`load_segmenter` / `make_segmenter` (the model type in a run's metadata),
`export_model` (the run's task and model type) and the custom Keras objects
of every `.keras` file rmib writes (importing this module imports every
method, which registers them) all read it. A new method
adds a folder under `rmib/methods/` and one row here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import click
import numpy as np

from rmib import export, training
from rmib.config import config_to_dict
from rmib.errors import RmibError
from rmib.inference.options import TilingOptions
from rmib.methods.classifier import export as classifier_export
from rmib.methods.classifier import train as classifier_train
from rmib.methods.classifier.config import PretrainConfig
from rmib.methods.dual2net import export as dual2net_export
from rmib.methods.dual2net import train as dual2net_train
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter
from rmib.methods.encoder_decoder import export as encoder_decoder_export
from rmib.methods.encoder_decoder import train as encoder_decoder_train
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter
from rmib.methods.encoders import check_encoder, describe_encoder
from rmib.methods.grading import export as grading_export
from rmib.methods.grading.config import GradeConfig
from rmib.methods.grading.grader import Grader
from rmib.methods.grading.train import train_grader
from rmib.methods.local_global import config as local_global_config
from rmib.methods.local_global import export as local_global_export
from rmib.methods.local_global import train as local_global_train
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter
from rmib.methods.segment_config import SEGMENT_MODELS, SegmentConfig
from rmib.methods.segment_data import lesion_records, split_records
from rmib.training.devices import with_precision


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
        export: `export(run_metadata)` -> the `rmib.export.archive.Exporter`
            that declares a run's serving signatures (`rmib export`), raising
            `RmibError` for a run it cannot export; None: no export.
    """

    name: str
    task: str
    train: Callable
    segmenter: type | None = None
    check: Callable | None = None
    export: Callable | None = None


METHODS = {
    "classifier": Method(
        "classifier",
        "pretrain",
        classifier_train.run_pretrain,
        export=classifier_export.export,
    ),
    "encoder-decoder": Method(
        "encoder-decoder",
        "segment",
        encoder_decoder_train.train,
        TiledSegmenter,
        encoder_decoder_train.check_config,
        encoder_decoder_export.export,
    ),
    "local-global": Method(
        "local-global",
        "segment",
        local_global_train.train,
        LocalGlobalSegmenter,
        local_global_config.resolve_sizes,
        local_global_export.export,
    ),
    "dual2net": Method(
        "dual2net",
        "segment",
        dual2net_train.train,
        Dual2NetSegmenter,
        dual2net_train.resolve_config,
        dual2net_export.export,
    ),
    "grading": Method("grading", "grade", train_grader, export=grading_export.export),
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


def run_segment(cfg: SegmentConfig, resume=False, echo=click.echo, dry_run=False) -> dict:
    """Train the configured segmenter in `cfg.out`; returns the validation metrics.

    Everything that can be checked without the data (the run directory, sizes,
    encoder, weights) is checked before the data is read; with `dry_run` the
    configuration, the data found and the run directory are printed and
    nothing is written (returns {}).
    """
    training.RunDirectory(cfg.out, create=False).refuse_new_run_over_old(resume)
    check_segment_config(cfg)
    check_encoder(cfg)
    if cfg.model == "encoder-decoder":
        echo(describe_encoder(cfg) + (f"; working scale {cfg.scale:g}" if cfg.scale != 1 else ""))
    records = lesion_records(cfg.data, cfg.lesion, cfg.on_bad)
    train_records, val_records = split_records(records, cfg)
    if not train_records:
        raise RmibError("every annotated image is held out for validation: nothing to train on")
    if dry_run:
        found = [
            f"{cfg.model} for {cfg.lesion}: {len(records)} images annotated for it in "
            f"{', '.join(map(str, cfg.data))}: {len(train_records)} for training, "
            f"{len(val_records)} for validation"
        ]
        echo(training.dry_run_report(cfg, found, cfg.out, resume))
        return {}
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
    tiling: TilingOptions | None = None,
    tile=None,
    overlap=None,
    batch_size=None,
    halo=None,
    max_tile=None,
    precision="float32",
    tta=None,
    **overrides,
):
    """Load a run directory or `.keras` file as a Segmenter.

    Args:
        model_path: run directory or `.keras` file.
        unsafe: allow models that need Keras unsafe deserialization (Lambda layers).
        tiling: how to tile (`rmib.inference.TilingOptions`); None: the run's own tiling.
        tile, overlap, batch_size, halo, max_tile: the same one by one ("auto" or
            a side; see `TiledSegmenter`); they override `tiling`.
        precision: the policy to predict in: "float32" (the default, as
            `rmib predict`), "mixed_bfloat16" or "mixed_float16" (see
            `rmib.training.devices.resolve_predict_precision` for "auto"); None: the
            precision the model was trained in.
        tta: test-time augmentation, one of `rmib.choices.TTA`; None: the run's
            choice (its metadata's "tta"), else "none".
        **overrides: metadata overrides (e.g. lesion="HE").

    Raises:
        RmibError: the file is not an rmib segmentation model, a bad tiling option,
            or a `tta` the model cannot take.
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
    given = dict(tile=tile, overlap=overlap, batch_size=batch_size, halo=halo, max_tile=max_tile)
    return make_segmenter(model, metadata, tiling=tiling, tta=tta, **given)


def make_segmenter(
    model,
    metadata,
    *,
    tiling: TilingOptions | None = None,
    tile=None,
    overlap=None,
    batch_size=None,
    halo=None,
    max_tile=None,
    tta=None,
):
    """The Segmenter of an already loaded model and its run metadata (as `load_segmenter`).

    Raises:
        RmibError: metadata of an unknown segmentation model type, a bad tile or `tta`.
    """
    tiling = TilingOptions.of(
        tiling, tile=tile, overlap=overlap, batch_size=batch_size, halo=halo, max_tile=max_tile
    )
    model_type = dict(metadata or {}).get("model", "encoder-decoder")
    if model_type not in SEGMENT_METHODS:
        raise RmibError(
            f"unknown segmentation model type {model_type!r} (known: {', '.join(SEGMENT_METHODS)})"
        )
    cls = SEGMENT_METHODS[model_type].segmenter
    if cls is TiledSegmenter:
        return cls(model, metadata, tiling=tiling, tta=tta)
    if tiling.auto_only:
        raise RmibError(
            f"--halo and --max-tile apply to encoder-decoder models, not to {model_type}"
        )
    return cls(model, metadata, tiling.tile, tiling.overlap, tiling.batch_size, tta=tta)


def method_of_run(run_metadata: dict) -> Method:
    """The method that trained a run: its metadata's task (and model type, for `rmib segment`).

    Raises:
        RmibError: an unknown task or segmentation model type.
    """
    task = run_metadata.get("task")
    if task == "segment":
        model_type = run_metadata.get("model", "encoder-decoder")
        if model_type not in SEGMENT_METHODS:
            raise RmibError(
                f"rmib export does not know the segmentation model type {model_type!r} "
                f"(known: {', '.join(SEGMENT_METHODS)})"
            )
        return SEGMENT_METHODS[model_type]
    for method in METHODS.values():
        if method.task == task:
            return method
    raise RmibError(
        f"not an rmib classifier, segmenter or grader (task {task!r} in its metadata); "
        "rmib export takes a run of `rmib pretrain`, `rmib segment` or `rmib grade train`"
    )


def run_exporter(run_metadata: dict):
    """The `rmib.export.archive.Exporter` of a run, from its method's row.

    Raises:
        RmibError: a run rmib cannot export.
    """
    method = method_of_run(run_metadata)
    if method.export is None:
        raise RmibError(f"rmib export cannot export a {method.name} run")
    return method.export(run_metadata)


def export_model(
    model_path,
    out,
    format: str = "savedmodel",
    *,
    check: bool = False,
    unsafe: bool = False,
    tile: int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
) -> export.ExportResult:
    """Export a trained rmib model; written atomically (a failed export leaves no trace).

    Every model rmib trains exports: classifiers (`rmib pretrain`), the
    encoder-decoder, local-global and Dual2Net segmenters (`rmib segment`)
    and the two-stage grader (`rmib grade train`, SavedModel only), each with
    the signatures its method's `export` declares (see `rmib.export`).

    Args:
        model_path: a run directory of `rmib pretrain`, `rmib segment` or
            `rmib grade train`, or the `.keras` file of a classifier or segmenter.
        out: the SavedModel folder, `.keras` file or `.tflite` file to write.
        format: "savedmodel", "keras" or "tflite" (the batch signature:
            ``classify``, ``segment_patch`` or ``segment_resized``).
        check: reload the export and compare it with rmib's own prediction
            on sample inputs; a max abs difference of the precision's
            tolerance or more is an error and nothing is written.
        unsafe: allow models with Lambda layers (`--unsafe-load`).
        tile, overlap, batch_size: tiling of ``segment_image`` (tiled
            segmenters); default what `rmib predict` uses for the run.
        precision: what the SavedModel or TFLite graph computes in, one of
            `rmib.training.devices.PREDICT_PRECISIONS`; None: float32 (portable, and
            as accurate as the weights allow). The check compares with rmib's
            own prediction in the same precision, within
            `rmib.training.devices.check_tolerance` of it. A ``keras`` copy keeps the
            precision the model was trained in (None only).

    Returns:
        An `rmib.export.ExportResult`.

    Raises:
        RmibError: not an rmib model, a model type rmib cannot export, a
            format the model has no file for (``keras`` of a grader), a bad
            tile or overlap (or one given to a model that does not tile), a
            failed TFLite conversion (naming the op) or a failed check.

    Example:
        >>> export_model("runs/ex", "exports/ex", check=True).differences
        {'segment_patch': 1.2e-07, 'segment_image': 2.4e-07}
    """
    return export.export_run(
        model_path,
        out,
        format,
        exporter_of=run_exporter,
        check=check,
        unsafe=unsafe,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        precision=precision,
    )


def run_pretrain(cfg, resume=False, echo=click.echo, dry_run=False) -> dict:
    """Train the stage-1 classifier (`rmib pretrain`); see `rmib.methods.classifier.train`."""
    return classifier_train.run_pretrain(cfg, resume=resume, echo=echo, dry_run=dry_run)


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
    "export_model",
    "load_grader",
    "load_segmenter",
    "make_segmenter",
    "method_of_run",
    "run_exporter",
    "run_pretrain",
    "run_segment",
    "train_grader",
]
