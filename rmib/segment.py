"""`rmib segment`: one binary lesion segmenter, trained on lesion-aware patches.

The default model is the RMIB paper's stage 2: the feature extractor of a
stage-1 classifier (`--encoder RUN_DIR`) becomes the frozen encoder of an
encoder-decoder. `--model local-global` and `--model dual2net` hand the same
configuration and data split to the ports in `rmib.methods`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import click
import keras
import numpy as np

from rmib import losses, metrics, training
from rmib.data import readers
from rmib.data.pipeline import (
    PreprocessedCache,
    Preprocessing,
    load_examples,
    patch_dataset,
    rescale_example,
    split_by_names,
    stratified_split,
)
from rmib.errors import RmibError
from rmib.segment_config import ENCODER_DECODER_MULTIPLE, SegmentConfig
from rmib.segmenters import SEGMENTER_TYPES, TiledSegmenter

METHOD_MODULES = {"local-global": "rmib.methods.local_global", "dual2net": "rmib.methods.dual2net"}


def lesion_records(data_roots, lesion, on_bad="error"):
    """Records of every root annotated for `lesion`.

    Raises:
        RmibError: no root, no image annotated for the lesion, or a root whose
            every mask of the lesion is all zero (`readers.require_lesion_pixels`).
    """
    if not data_roots:
        raise RmibError("no --data given: name at least one dataset root with lesion masks")
    records, seen = [], []
    for root in data_roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        # A dataset's own test split is kept for `rmib evaluate --split test`.
        chosen = [r for r in dataset.with_lesion(lesion) if r.split != "test"]
        readers.require_lesion_pixels(chosen, lesion, root)
        seen.append(f"{root} ({dataset.layout}: {len(chosen)} of {len(dataset)})")
        records += chosen
    if not records:
        raise RmibError(f"no image annotated for {lesion} in {'; '.join(seen)}")
    return records


def check_patch_size(cfg: SegmentConfig) -> None:
    """Refuse a patch side the chosen model cannot take, before any data is read.

    The encoder-decoder needs multiples of 32 (its encoder halves its input
    five times); the local-global U-Nets multiples of 2**depth
    (`rmib.methods.local_global.resolve_sizes`); Dual2Net takes no patches.

    Raises:
        RmibError: naming the patch side and the multiple expected.
    """
    if cfg.model == "encoder-decoder":
        multiple = ENCODER_DECODER_MULTIPLE
        if cfg.patch_size % multiple:
            below = max(multiple, cfg.patch_size // multiple * multiple)
            raise RmibError(
                f"--patch-size {cfg.patch_size}: the encoder-decoder takes multiples of "
                f"{multiple} (its encoder halves the patch five times), e.g. {below} or "
                f"{below + multiple}"
            )
    elif cfg.model == "local-global":
        importlib.import_module(METHOD_MODULES[cfg.model]).resolve_sizes(cfg)


def split_records(records, cfg: SegmentConfig):
    """Whole images held out for validation: --val-names, else a stratified --val-fraction."""
    if cfg.val_names:
        return split_by_names(records, cfg.val_names)
    if cfg.val_fraction == 0:
        return list(records), []
    if len(records) < 2:
        raise RmibError(f"{len(records)} image(s) annotated: need 2 or more to hold one out")
    return stratified_split(
        records,
        cfg.val_fraction,
        seed=cfg.train.seed,
        key=lambda r: r.masks.get(cfg.lesion) is not None,
    )


class WholeImageValidation(keras.callbacks.Callback):
    """Validation metrics on held-out whole photographs, predicted as in production.

    Adds `val_aupr`, `val_f1`, `val_iou`, `val_sensitivity` and `val_ppv` to
    the epoch's logs every `every` epochs and at the last epoch (the last of
    `epochs`, or one that a time limit of `rmib.training` makes the last: it
    sets `stop_training` before this runs). Epochs in between log NaN (not
    computed: they never count as an improvement of a monitor, and the
    history shows which epochs were validated). It must run before the
    checkpoint callback so that the best checkpoint sees them. `results`
    keeps every validated epoch's full metrics (`evaluate_examples`), by
    1-based epoch, so the caller need not predict them again.

    Args:
        examples: preprocessed validation `Example`s (image, mask, fov).
        make_segmenter: model -> `rmib.segmenters.Segmenter`.
        every: compute every this many epochs (and always at the last epoch).
        threshold: the threshold of the pixel metrics.
        epochs: the number of epochs of the fit, if known.
    """

    KEYS = ("aupr", "f1", "iou", "sensitivity", "ppv")

    def __init__(self, examples, make_segmenter, every=1, threshold=0.5, epochs=None):
        super().__init__()
        self.examples = examples
        self.make_segmenter = make_segmenter
        self.every = every
        self.threshold = threshold
        self.epochs = epochs
        self.results: dict[int, dict] = {}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        last_epoch = (self.epochs is not None and epoch + 1 >= self.epochs) or bool(
            getattr(self.model, "stop_training", False)
        )
        if (epoch + 1) % self.every and not last_epoch:
            logs.update({f"val_{k}": float("nan") for k in self.KEYS})
            return
        result = evaluate_examples(
            self.make_segmenter(self.model), self.examples, threshold=self.threshold
        )
        self.results[epoch + 1] = result
        logs.update({f"val_{k}": result[k] for k in self.KEYS})


def final_validation(run, phase, callback, evaluate):
    """The validation metrics of the weights a fit ended with, reusing `callback`'s.

    `training.fit` ends with the best epoch's weights, or the last epoch's
    (metrics.json "weights" of `phase`, the phase given to fit, or None).
    When `callback` validated that epoch in this process, its metrics are
    returned; otherwise `evaluate()` computes them (a resumed run, a worker's
    copy of the run).
    """
    try:
        training_metrics = run.read_metrics()["training" if phase is None else f"training_{phase}"]
        key = "best_epoch" if training_metrics["weights"] == "best" else "epochs_trained"
        epoch = int(training_metrics[key])
    except (KeyError, TypeError, ValueError, OSError, RmibError):
        return evaluate()
    if callback is not None and epoch in callback.results:
        return dict(callback.results[epoch])
    return evaluate()


def evaluate_examples(segmenter, examples, threshold=0.5, fov_only=False):
    """AUPR (pooled, streaming) and pixel metrics at `threshold` over whole images."""
    aupr = metrics.StreamingAUPR()
    totals = np.zeros(4, np.int64)
    for example in examples:
        truth = np.asarray(example.mask)
        fov = np.asarray(example.fov)
        prob = segmenter.predict_prepared(np.asarray(example.image), fov)
        region = fov if fov_only else None
        aupr.update(truth, prob, mask=region)
        totals += np.asarray(metrics.confusion_counts(prob >= threshold, truth, mask=region))
    return {"aupr": aupr.result(), **metrics.pixel_metrics(*totals)}


def _is_run(path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix == ".keras"


def encoder_factory(cfg: SegmentConfig):
    """(function building the encoder inside the strategy scope, metadata, frozen?)."""
    if _is_run(cfg.encoder):
        source = Path(cfg.encoder)
        if not source.exists():
            raise RmibError(f"--encoder {source}: no such run directory or .keras file")
        meta = training.read_run_metadata(source)
        if meta.get("task") not in (None, "pretrain"):
            raise RmibError(
                f"--encoder {source}: a {meta.get('task')!r} run, expected a `rmib pretrain` run"
            )

        def build():
            classifier = training.load_model(source)
            try:
                return classifier.get_layer("backbone")
            except ValueError:
                raise RmibError(
                    f"--encoder {source}: the model has no 'backbone' layer; "
                    "expected a classifier trained by `rmib pretrain`"
                ) from None

        info = {
            "encoder": str(source),
            "backbone": meta.get("backbone"),
            "cbam": meta.get("cbam"),
            "encoder_weights": "stage-1",
        }
        frozen = cfg.freeze_encoder != "no"
        return build, info, frozen
    from rmib.models import BACKBONES, build_backbone

    if cfg.encoder not in BACKBONES:
        raise RmibError(
            f"--encoder {cfg.encoder!r}: not a run directory, a .keras file or a backbone "
            f"(valid backbones: {', '.join(BACKBONES)})"
        )
    weights = None if cfg.weights in ("", "none") else cfg.weights

    def build():
        return build_backbone(cfg.encoder, cbam=cfg.cbam, weights=weights, model_name="backbone")

    frozen = cfg.freeze_encoder == "yes" or (cfg.freeze_encoder == "auto" and weights is not None)
    info = {
        "encoder": cfg.encoder,
        "backbone": cfg.encoder,
        "cbam": cfg.cbam,
        "encoder_weights": cfg.weights,
    }
    return build, info, frozen


def describe_encoder(cfg: SegmentConfig) -> str:
    """One line saying what the encoder-decoder's encoder is built from, and whether it trains.

    `rmib segment` prints it first, so a run without `--encoder` cannot be
    mistaken for the transferred stage-1 encoder: that default is VGG16 from
    scratch.
    """
    if _is_run(cfg.encoder):
        frozen = "frozen" if cfg.freeze_encoder != "no" else "trainable"
        return f"encoder: the stage-1 classifier of {cfg.encoder}, transferred, {frozen}"
    name = cfg.encoder + ("+CBAM" if cfg.cbam else "")
    if cfg.weights in ("", "none"):
        trainable = "frozen" if cfg.freeze_encoder == "yes" else "trainable"
        return (
            f"encoder: {name} from scratch (random init, {trainable}; "
            "pass --encoder RUN to transfer a stage-1 classifier)"
        )
    frozen = "trainable" if cfg.freeze_encoder == "no" else "frozen"
    return f"encoder: {name} with {cfg.weights} weights, {frozen}"


def _loss(cfg):
    if cfg.loss == "weighted-bce":
        return losses.get_loss("weighted-bce", gamma=cfg.gamma)
    return losses.get_loss(cfg.loss)


def train_encoder_decoder(cfg: SegmentConfig, train_records, val_records, run, resume=False):
    """RMIB stage 2: the (stage-1) encoder, frozen, with a residual decoder, on patches."""
    from rmib.models import build_encoder_decoder

    build_encoder, info, frozen = encoder_factory(cfg)
    prep = Preprocessing(method=cfg.preprocessing)
    cache = PreprocessedCache(cfg.cache_dir or None)
    problems = []
    train_examples, _ = load_examples(train_records, prep, cfg.lesion, cache, cfg.on_bad, problems)
    val_examples, _ = load_examples(val_records, prep, cfg.lesion, cache, cfg.on_bad, problems)
    if not train_examples:
        raise RmibError("no training image could be read")
    # Patches are sampled at the working resolution; validation photographs stay
    # whole: the segmenter predicts them at `scale` and scores at full resolution.
    train_examples = [rescale_example(e, cfg.scale) for e in train_examples]
    del cache  # at scale < 1 the full-resolution training photographs are no longer needed
    metadata = {
        "task": "segment",
        "model": "encoder-decoder",
        "lesion": cfg.lesion,
        "preprocessing": prep.to_dict(),
        "patch_size": cfg.patch_size,
        "scale": cfg.scale,
        "predict_tile": cfg.predict_tile,
        "predict_halo": cfg.predict_halo,
        "predict_max_tile": cfg.predict_max_tile,
        "size_multiple": ENCODER_DECODER_MULTIPLE,
        "loss": cfg.loss,
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
        **info,
    }
    batch_size = training.global_batch_size(cfg.train)
    steps = max(1, cfg.patches_per_epoch // batch_size)
    total_epochs = cfg.train.epochs
    phases = [(None, total_epochs, cfg.train.learning_rate, frozen)]
    if cfg.fine_tune_after and frozen and cfg.fine_tune_after < total_epochs:
        phases = [
            ("frozen", cfg.fine_tune_after, cfg.train.learning_rate, True),
            (
                "fine-tune",
                total_epochs - cfg.fine_tune_after,
                cfg.train.learning_rate * cfg.fine_tune_lr_factor,
                False,
            ),
        ]
    monitor_val = bool(val_examples)
    model = None
    offset = 0
    for phase, epochs, lr, freeze in phases:
        phase_cfg = dataclasses.replace(
            cfg.train,
            epochs=epochs,
            learning_rate=lr,
            monitor=cfg.train.monitor if monitor_val else "loss",
        )
        state = run.read_state(phase) if resume else None
        start = int(state["epoch"]) if state else 0
        train_ds = patch_dataset(
            train_examples,
            cfg.patch_size,
            batch_size,
            steps,
            pos_fraction=cfg.pos_fraction,
            augment=cfg.augment,
            seed=cfg.train.seed,
            start_epoch=offset + start,
            epochs=offset + epochs,
        )
        previous = model

        def make_model(previous=previous, freeze=freeze):
            if previous is not None:
                from rmib.models.encoder_decoder import set_encoder_trainable

                set_encoder_trainable(previous, not freeze)
                return previous
            return build_encoder_decoder(build_encoder(), freeze_encoder=freeze)

        callbacks = []
        validation = None
        if val_examples:
            validation = WholeImageValidation(
                val_examples,
                lambda m: tiled_segmenter(m, metadata, cfg),
                every=cfg.val_every,
                epochs=epochs,
            )
            callbacks.append(validation)
        model, _ = training.fit(
            make_model,
            train_ds,
            None,
            config=phase_cfg,
            run_dir=run,
            loss=_loss(cfg),
            metrics=None,
            metadata=metadata,
            phase=phase,
            resume=resume,
            validation_callbacks=callbacks,
            steps_per_epoch=steps,
            save_final=phase == phases[-1][0],
        )
        offset += epochs
    result = {}
    if val_examples:
        segmenter = tiled_segmenter(model, metadata, cfg)
        result = final_validation(
            run, phases[-1][0], validation, lambda: evaluate_examples(segmenter, val_examples)
        )
    if problems and training.is_chief(training.get_strategy(cfg.train.strategy)):
        from rmib.predict import write_skipped

        write_skipped(run.path, problems)
    return result


def tiled_segmenter(model, metadata: dict, cfg) -> TiledSegmenter:
    """The encoder-decoder's `TiledSegmenter` with the tiling of a `SegmentConfig`.

    ``predict_tile = "auto"`` plans large tiles overlapping by 2 * predict_halo
    pixels (one per call); a number gives fixed tiles overlapping by the fraction
    predict_overlap, predict_batch per call.
    """
    if cfg.predict_tile == "auto":
        return TiledSegmenter(
            model, metadata, "auto", halo=cfg.predict_halo, max_tile=cfg.predict_max_tile
        )
    return TiledSegmenter(model, metadata, cfg.predict_tile, cfg.predict_overlap, cfg.predict_batch)


def run_segment(cfg: SegmentConfig, resume=False, echo=click.echo) -> dict:
    """Train the configured segmenter in `cfg.out`; returns the validation metrics."""
    training.RunDirectory(cfg.out, create=False).refuse_new_run_over_old(resume)
    check_patch_size(cfg)
    if cfg.model == "encoder-decoder":
        echo(describe_encoder(cfg) + (f"; working scale {cfg.scale:g}" if cfg.scale != 1 else ""))
    records = lesion_records(cfg.data, cfg.lesion, cfg.on_bad)
    train_records, val_records = split_records(records, cfg)
    if not train_records:
        raise RmibError("every annotated image is held out for validation: nothing to train on")
    run = training.RunDirectory(cfg.out)
    from rmib.config import config_to_dict

    # Only the chief of a multi-worker run writes `--out` (the runner puts the
    # other workers' checkpoints under `workers/`).
    chief = training.is_chief(training.get_strategy(cfg.train.strategy))
    if chief:
        run.write_config(config_to_dict(cfg))
    echo(
        f"{cfg.model} for {cfg.lesion}: {len(train_records)} training and "
        f"{len(val_records)} validation images -> {run.path}"
    )
    if cfg.model == "encoder-decoder":
        result = train_encoder_decoder(cfg, train_records, val_records, run, resume)
    else:
        module = importlib.import_module(METHOD_MODULES[cfg.model])
        result = module.train(cfg, train_records, val_records, run, resume=resume)
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


__all__ = ["run_segment", "WholeImageValidation", "evaluate_examples", "SEGMENTER_TYPES"]
