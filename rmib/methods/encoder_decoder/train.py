"""RMIB stage 2 training: the (stage-1) encoder, frozen, with a residual decoder, on patches."""

from __future__ import annotations

import dataclasses

from rmib import io, losses, training
from rmib.data.pipeline import (
    PreprocessedCache,
    Preprocessing,
    load_examples,
    patch_dataset,
    rescale_example,
)
from rmib.errors import RmibError
from rmib.evaluation import WholeImageValidation, evaluate_examples, final_validation
from rmib.methods.encoder_decoder.segmenter import tiled_segmenter
from rmib.methods.encoders import encoder_factory
from rmib.methods.segment_config import ENCODER_DECODER_MULTIPLE, SegmentConfig


def _loss(cfg):
    if cfg.loss == "weighted-bce":
        return losses.get_loss("weighted-bce", gamma=cfg.gamma)
    return losses.get_loss(cfg.loss)


def train(cfg: SegmentConfig, train_records, val_records, run, resume=False):
    """RMIB stage 2: the (stage-1) encoder, frozen, with a residual decoder, on patches."""
    from rmib.methods.encoder_decoder.model import build_encoder_decoder

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
                from rmib.methods.encoder_decoder.model import set_encoder_trainable

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
        io.write_skipped(run.path, problems)
    return result


def check_config(cfg: SegmentConfig) -> None:
    """Refuse a patch side the encoder-decoder cannot take, before any data is read.

    Its encoder halves the input five times: patches are multiples of 32.

    Raises:
        RmibError: naming the patch side and the multiples around it.
    """
    multiple = ENCODER_DECODER_MULTIPLE
    if cfg.patch_size % multiple:
        below = max(multiple, cfg.patch_size // multiple * multiple)
        raise RmibError(
            f"--patch-size {cfg.patch_size}: the encoder-decoder takes multiples of "
            f"{multiple} (its encoder halves the patch five times), e.g. {below} or "
            f"{below + multiple}"
        )
