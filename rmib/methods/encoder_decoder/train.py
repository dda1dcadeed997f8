"""RMIB stage 2 training: the (stage-1) encoder, frozen, with a residual decoder, on patches."""

from __future__ import annotations

import dataclasses

from rmib import losses, training
from rmib.data.pipeline import Preprocessing, patch_dataset, rescale_example
from rmib.errors import RmibError
from rmib.evaluation import evaluate_examples
from rmib.methods.encoder_decoder.segmenter import tiled_segmenter
from rmib.methods.encoders import encoder_factory
from rmib.methods.segment_config import ENCODER_DECODER_MULTIPLE, SegmentConfig, tta_metadata


def _loss(cfg):
    if cfg.loss == "weighted-bce":
        return losses.get_loss("weighted-bce", gamma=cfg.gamma)
    return losses.get_loss(cfg.loss)


def train(cfg: SegmentConfig, train_records, val_records, run, resume=False):
    """RMIB stage 2: the (stage-1) encoder, frozen, with a residual decoder, on patches.

    One phase, or two with `fine_tune_after` (a frozen and a fine-tuning
    phase), run by `rmib.training.TrainingJob`: `--time-limit` is for both.
    """
    from rmib.methods.encoder_decoder.model import build_encoder_decoder

    build_encoder, info, frozen = encoder_factory(cfg)
    prep = Preprocessing(method=cfg.preprocessing)
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
    job = training.TrainingJob(run, cfg.train, resume=resume, phases=[p[0] for p in phases])
    train_examples = job.load_examples(train_records, prep, cfg.lesion, cfg.cache_dir, cfg.on_bad)
    val_examples = job.load_examples(val_records, prep, cfg.lesion, cfg.cache_dir, cfg.on_bad)
    if not train_examples:
        raise RmibError("no training image could be read")
    # Patches are sampled at the working resolution; validation photographs stay
    # whole: the segmenter predicts them at `scale` and scores at full resolution.
    # (At scale < 1 the full-resolution training photographs are dropped here.)
    train_examples = [rescale_example(e, cfg.scale) for e in train_examples]
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
        **tta_metadata(cfg),
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
        **info,
    }
    batch_size = job.batch_size
    steps = max(1, cfg.patches_per_epoch // batch_size)
    monitor_val = bool(val_examples)
    offset = 0
    for phase, epochs, lr, freeze in phases:
        phase_cfg = dataclasses.replace(
            cfg.train,
            epochs=epochs,
            learning_rate=lr,
            monitor=cfg.train.monitor if monitor_val else "loss",
        )
        train_ds = patch_dataset(
            train_examples,
            cfg.patch_size,
            batch_size,
            steps,
            pos_fraction=cfg.pos_fraction,
            augment=cfg.augment,
            colour_jitter=cfg.colour_jitter,
            seed=cfg.train.seed,
            start_epoch=offset + job.start_epoch(phase),
            epochs=offset + epochs,
        )

        def make_model(previous=job.model, freeze=freeze):
            if previous is not None:
                from rmib.methods.encoder_decoder.model import set_encoder_trainable

                set_encoder_trainable(previous, not freeze)
                return previous
            return build_encoder_decoder(build_encoder(), freeze_encoder=freeze)

        job.fit(
            make_model,
            train_ds,
            config=phase_cfg,
            metadata=metadata,
            phase=phase,
            validation=job.validation(
                val_examples,
                lambda m: tiled_segmenter(m, metadata, cfg),
                every=cfg.val_every,
                epochs=epochs,
            ),
            loss=_loss(cfg),
            metrics=None,
            steps_per_epoch=steps,
        )
        if not job.running:
            break
        offset += epochs
    if not val_examples:
        return job.finish()
    return job.finish(
        lambda model: evaluate_examples(tiled_segmenter(model, metadata, cfg), val_examples)
    )


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
