"""Training of Dual2Net with the dual-sampling modulated (DSM) Dice loss (`rmib segment --model dual2net`).

The model and its loss are in `rmib.methods.dual2net.model`; this module feeds it the
way the paper does and runs it through `rmib.training.TrainingJob`:

- Data: every photograph is preprocessed once (`cfg.preprocessing`; with
  `[dual2net] fov_crop` first cropped to its field of view, the paper's DDR
  preprocessing) and resized whole to `[dual2net] image_size` (aspect kept,
  centred zero padding: 960x1440 for IDRiD, 1024x1024 for DDR), the mask by
  nearest neighbour. Training sees only these resized photographs, never tiles.
- Each step takes two independently drawn batches, one per branch: each
  branch runs through its own permutation of the training images every epoch
  (the last batch filled from a further permutation), so an epoch is
  ceil(images / batch_size) steps and every image reaches each branch at
  least once per epoch. The small-lesion batch carries the re-balanced pixel
  sample (`rmib.losses.sample_rebalanced_pixels`, N1/N = `pos_fraction`)
  drawn in the pipeline. Augmentation: flips and quarter turns only (`rot90`;
  on a non-square size a quarter turn would change the shape, so it is a half
  turn there). All draws are stateless, seeded by (seed, epoch, example).
- alpha = 1 - (epoch / epochs)^2 is set per epoch by
  `rmib.methods.dual2net.loss.DSMAlphaSchedule` and logged as "dsm_alpha".
- Validation: whole held-out photographs at full resolution through
  `Dual2NetSegmenter`, exactly as `rmib predict` (`rmib.evaluation.WholeImageValidation`).

Paper defaults (applied by `resolve_config` to every `[train]` value still at
its `SegmentConfig` default, so whatever a recipe or flag sets wins; a value
set to exactly the default is indistinguishable from an unset one): SGD,
learning rate 0.03 with poly decay (power 0.9), momentum 0.9, weight decay
5e-4 coupled into the gradient as PyTorch's SGD (`weight_decay_mode`
"coupled"; Keras' decoupled form would decay about 10x less under momentum
0.9), batch size 2; `augment` "free" becomes "rot90".
Without validation images a `val_*` monitor left at its default becomes
"loss" with `restore_best` off (the paper keeps the last epoch). The encoder
is fine-tuned (`freeze_encoder` "auto" and "no"), as in the paper; "yes"
freezes the shared trunk (the branches' copies of the last block stay trainable).
"""

from __future__ import annotations

import dataclasses
import sys

from rmib import training
from rmib.data.pipeline import Preprocessing
from rmib.errors import RmibError
from rmib.evaluation import evaluate_examples
from rmib.methods.dual2net.data import (
    PAPER_AUGMENT,
    load_resized,
    steps_per_epoch,
    training_dataset,
)
from rmib.methods.dual2net.loss import DSMAlphaSchedule
from rmib.methods.dual2net.model import SIZE_MULTIPLE, build_dual2net
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter
from rmib.methods.segment_config import SegmentConfig, tta_metadata

# The loss of each `[dual2net] variant` (rmib.methods.dual2net.model.LOSS_VARIANTS).
VARIANT_LOSS = {"dual-dsm": "dsm", "single-dice": "dice", "single-bce": "bce"}
# The paper's optimisation (section 4.2), applied where `[train]` keeps SegmentConfig's defaults.
PAPER_TRAIN = {
    "optimizer": "sgd",
    "learning_rate": 0.03,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "weight_decay_mode": "coupled",
    "lr_schedule": "poly",
    "poly_power": 0.9,
    "batch_size": 2,
}


def resolve_config(cfg: SegmentConfig, has_validation: bool = True) -> tuple[SegmentConfig, list]:
    """`cfg` with Dual2Net's paper defaults where the user kept SegmentConfig's.

    Returns:
        (config, notes): the resolved config and one line per change made.

    Raises:
        RmibError: settings Dual2Net cannot honour (class weights, fine_tune_after,
            a non-default validation monitor without validation images).
    """
    defaults = SegmentConfig()
    notes = []
    changes = {
        key: value
        for key, value in PAPER_TRAIN.items()
        if getattr(cfg.train, key) == getattr(defaults.train, key)
        and getattr(cfg.train, key) != value
    }
    if changes:
        notes.append(
            "paper settings for [train]: " + ", ".join(f"{k}={v}" for k, v in changes.items())
        )
    train = dataclasses.replace(cfg.train, **changes)
    augment = cfg.augment
    if augment == defaults.augment and augment != PAPER_AUGMENT:
        augment = PAPER_AUGMENT
        notes.append(f"augment={PAPER_AUGMENT} (flips and quarter turns, as the paper)")
    if not has_validation and train.monitor.startswith("val_"):
        if train.monitor != defaults.train.monitor:
            raise RmibError(
                f"monitor {train.monitor!r} needs validation images, and none are held out; "
                "set val_fraction or val_names, or monitor 'loss'"
            )
        train = dataclasses.replace(train, monitor="loss", monitor_mode="min", restore_best=False)
        notes.append("no validation images: keeping the last epoch (monitor=loss, no restore)")
    if cfg.train.class_weights:
        raise RmibError(
            "class_weights does not apply to dual2net: its losses balance the classes "
            "themselves (DSM Dice, or class-balanced cross-entropy for variant single-bce)"
        )
    if cfg.fine_tune_after:
        raise RmibError(
            "fine_tune_after does not apply to dual2net: it fine-tunes the whole network from "
            "the first epoch (freeze_encoder=yes keeps the shared trunk frozen throughout)"
        )
    return dataclasses.replace(cfg, train=train, augment=augment), notes


def preprocessing_of(cfg: SegmentConfig) -> Preprocessing:
    """How photographs are prepared before the resize to `image_size` (stored in the metadata)."""
    return Preprocessing(method=cfg.preprocessing, fov_crop=cfg.dual2net.fov_crop)


def build_model(cfg: SegmentConfig, build_encoder=None):
    """The `Dual2Net` of a config; `build_encoder` returns the encoder (a backbone model),
    default the one `cfg.encoder` names (a stage-1 run or a backbone)."""
    d2 = cfg.dual2net
    if build_encoder is None:
        from rmib.methods.encoders import encoder_factory

        build_encoder = encoder_factory(cfg)[0]
    return build_dual2net(
        build_encoder(),
        loss=VARIANT_LOSS[d2.variant],
        head=d2.head,
        freeze_trunk=cfg.freeze_encoder == "yes",
        aux_weight=d2.aux_weight,
        head_filters=d2.head_filters,
        output_stride=d2.output_stride,
    )


def evaluate_with_regions(segmenter, examples, threshold=0.5) -> dict:
    """Whole-image validation metrics with the region scores, as `rmib evaluate` gives them.

    `rmib.evaluation.evaluate_examples` with ``regions=True``: pooled AUPR, the
    authors' 11-threshold AUPR, pixel metrics and region F at sigma 0.2 ... 0.8.
    """
    return evaluate_examples(segmenter, examples, threshold=threshold, regions=True)


def _say(message: str, verbose) -> None:
    if verbose:
        print(f"rmib: dual2net: {message}", file=sys.stderr, flush=True)


def train(
    cfg: SegmentConfig, train_records, val_records, run, resume: bool = False, *, verbose=None
) -> dict:
    """Train Dual2Net (or a single-branch ablation, `[dual2net] variant`) in `run`.

    Resizes every photograph to `[dual2net] image_size`, trains with the DSM
    Dice loss through `rmib.training.TrainingJob` (checkpoints, resume, history with
    the loss terms and "dsm_alpha"), validates every `val_every` epochs on the
    held-out whole photographs at full resolution, and saves `model.keras`:
    the inference model (image -> mean of the branches, without the aux heads)
    with the run's metadata (task "segment", model "dual2net", lesion,
    preprocessing, image_size, variant, head, backbone, ...), which
    `rmib.load_segmenter` turns into a `Dual2NetSegmenter`.

    Args:
        cfg: the segment configuration (`cfg.dual2net` holds this method's
            settings; see `resolve_config` for the paper defaults).
        train_records, val_records: `Record`s annotated for `cfg.lesion`.
        run: the `rmib.training.RunDirectory` (or its path).
        resume: continue an interrupted run.
        verbose: 0 silent, 1 progress bars, 2 a line per epoch; None: by the terminal.

    Returns:
        Validation metrics of the final model on the held-out whole photographs
        at full resolution: "aupr", the pixel metrics at 0.5 ("f1", "iou",
        "sensitivity", "ppv", ...) and "region_f_score" {sigma: F}; {} without
        validation images or when training stopped before its last epoch.

    Raises:
        RmibError: no readable training image, settings Dual2Net cannot honour,
            and the errors of `rmib.training.fit`.
    """
    from rmib.methods.encoders import encoder_factory

    # Refuse what it cannot honour, early; the job runs in the resolved batch size.
    early, _ = resolve_config(cfg, has_validation=bool(val_records))
    build_encoder, encoder_info, _ = encoder_factory(cfg)
    d2 = cfg.dual2net
    prep = preprocessing_of(cfg)
    job = training.TrainingJob(run, early.train, resume=resume, verbose=verbose)
    run = job.run
    train_set = load_resized(
        train_records, prep, cfg.lesion, d2.image_size, cfg.cache_dir, cfg.on_bad, job.problems
    )
    if not len(train_set):
        raise RmibError("no training image could be read")
    val_examples = job.load_examples(val_records, prep, cfg.lesion, cfg.cache_dir, cfg.on_bad)
    cfg, notes = resolve_config(cfg, has_validation=bool(val_examples))
    for note in notes:
        _say(note, job.verbose)
    # Only the chief of a multi-worker run writes the run directory itself; the
    # others keep their model where the runner put their checkpoints.
    if job.chief:
        run.write_config(cfg)  # as resolved, paper defaults included

    metadata = {
        "task": "segment",
        "model": "dual2net",
        "lesion": cfg.lesion,
        "preprocessing": prep.to_dict(),
        "image_size": [int(s) for s in d2.image_size],
        "size_multiple": SIZE_MULTIPLE,
        "variant": d2.variant,
        "head": d2.head,
        "loss": VARIANT_LOSS[d2.variant],
        "pos_fraction": d2.pos_fraction,
        "aux_weight": d2.aux_weight,
        "output_stride": d2.output_stride,
        "trunk_frozen": cfg.freeze_encoder == "yes",
        **tta_metadata(cfg),
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
        **encoder_info,
    }
    steps = steps_per_epoch(cfg, len(train_set))
    train_ds = training_dataset(
        train_set,
        job.batch_size,  # --batch-size is per replica
        steps,
        dual=d2.variant == "dual-dsm",
        pos_fraction=d2.pos_fraction,
        augment=cfg.augment,
        seed=cfg.train.seed,
        start_epoch=job.start_epoch(),
        epochs=cfg.train.epochs,
    )

    def inference_network(model):
        # model.keras holds image -> mean of the branches, without the aux heads.
        network = model.inference_model(name=model.name)
        job.own_run.write_metadata({"parameters": int(network.count_params())})
        return network

    job.fit(
        lambda: build_model(cfg, build_encoder),
        train_ds,
        config=cfg.train,
        metadata=metadata,
        validation=job.validation(
            val_examples,
            lambda model: Dual2NetSegmenter(model, metadata),
            every=cfg.val_every,
            epochs=cfg.train.epochs,
        ),
        final_model=inference_network,
        loss=None,
        extra_callbacks=[DSMAlphaSchedule(cfg.train.epochs)],
        steps_per_epoch=steps,
    )
    if not val_examples:
        return job.finish()
    # The region scores are not among the validation callback's metrics.
    return job.finish(
        lambda network: evaluate_with_regions(
            Dual2NetSegmenter(network, job.own_run.read_metadata()), val_examples
        ),
        reuse_validation=False,
    )
