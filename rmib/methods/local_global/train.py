"""Training of the fused local-global U-Net (Yan et al., ISBI 2019) in its four phases.

    global  GlobalNet alone on whole photographs resized to `global_size`
            (`[train]`: the recipes use Adam 2e-4 with polynomial decay)
    local   LocalNet alone on lesion-aware full-resolution patches (same settings)
    fusion  the fusion module only, everything before it frozen (10 epochs, 2e-4)
    joint   everything unfrozen (60 epochs, 1e-4)

Each phase is one `rmib.training.TrainingJob.fit` call with its own files in
the run directory (`history_<phase>.csv`, `checkpoints/last_<phase>.keras` ...),
so a resumed run skips the finished phases and continues the one it was in;
`--time-limit` is for the four phases together (a limit reached in an earlier
phase ends the run with that phase's net as `model.keras`). The next phase starts from the best weights of the previous ones, moved by their
place in the model (`copy_matching_weights`). The last phase writes `model.keras`; the run's
metadata "network" says whether it is the fused model or, for a run of
["global"] or ["local"] alone (the paper's ablation), a single net, and
`rmib.methods.local_global.segmenter.LocalGlobalSegmenter` predicts with any of them.

Loss (eq. 1): L = l1 * L_global + l2 * L_local + l3 * phi(theta), both terms
the weighted cross-entropy of eq. 2 (`rmib.losses.weighted_bce`), phi the
squared L2 norm of every convolution kernel (Keras' L2 regulariser, i.e.
weight decay; the paper says "e.g. L2 norm"). The single nets train on their
own term plus l3 * phi.

Encoders: by default GlobalNet and LocalNet are plain U-Nets trained from
scratch, as in the paper. With `--encoder RUN_DIR` (a `rmib pretrain` run)
both nets (or those of `[local_global] encoder_nets`) get a copy of the
stage-1 classifier's backbone as their encoder, with the U-Net decoder over its
skip taps (`rmib.models.unet.build_encoder_unet_trunk`), frozen in every phase
unless `freeze_encoder = "no"` (as the encoder-decoder's; a backbone name with
`encoder_nets` set builds one from `--weights`). `fine_tune_after` is refused:
the phases decide what trains. A backbone's deepest tap is P5, so the paper's
depth 6 becomes 5 on one.

Data: every photograph is preprocessed once (IDRiD centre crop when it is at
least 2816 x 3328, then `cfg.preprocessing`). GlobalNet sees it resized to
`global_size` with its mask resized by area, i.e. the lesion fraction of each
pixel (a nearest-neighbour resize would erase most microaneurysms). The fused
net sees (whole photograph resized, a full-resolution patch, the patch's box)
with targets (global mask resized, patch mask); patches are lesion-aware
(`cfg.pos_fraction`). Augmentation: `cfg.augment` ("free": rotation, zoom,
flips, noise) for the single nets; quarter turns only for the fused net,
applied to the photograph, the patch and the box together.
"""

from __future__ import annotations

import math

from rmib import training
from rmib.data.pipeline import (
    PreprocessedCache,
    Preprocessing,
    patch_dataset,
)
from rmib.errors import RmibError
from rmib.methods.local_global.config import (
    NETWORK_OF_PHASE,
    EncoderSetup,
    Sizes,
    encoder_setup,
    phase_config,
    resolve_sizes,
)
from rmib.methods.local_global.data import fused_dataset, global_dataset, load_photographs
from rmib.methods.local_global.loss import WeightedBCE
from rmib.methods.local_global.model import (
    build_local_global,
    build_single_net,
    copy_backbone,
    copy_matching_weights,
    set_fusion_only_trainable,
)
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter
from rmib.methods.segment_config import SegmentConfig, tta_metadata


def _phase_model_builder(phase, sizes: Sizes, l2, trained: dict, encoders=None):
    frozen = bool(encoders and encoders.frozen)

    def backbones(*nets):
        # Each net gets its own copy of the source's layers its depth needs.
        wanted = [net for net in nets if encoders and net in encoders.nets]
        if not wanted:
            return {}
        source = encoders.build()
        return {
            net: copy_backbone(source, sizes.depths[net], name=f"{net}_backbone") for net in wanted
        }

    def single_net():  # phase "global" or "local": GlobalNet or LocalNet alone
        return build_single_net(
            phase,
            sizes.depths[phase],
            sizes.base_filters,
            sizes.max_filters,
            l2,
            encoder=backbones(phase).get(phase),
            freeze_encoder=frozen,
        )

    def fused():
        copies = backbones("global", "local")
        model = build_local_global(
            sizes.global_depth,
            sizes.local_depth,
            sizes.base_filters,
            sizes.max_filters,
            sizes.global_size,
            sizes.fusion_filters,
            l2,
            global_encoder=copies.get("global"),
            local_encoder=copies.get("local"),
            freeze_encoders=frozen,
        )
        if "fusion" in trained:
            sources = [trained["fusion"]]
        else:
            sources = [trained[name] for name in ("global", "local") if name in trained]
        for source in sources:
            copy_matching_weights(source, model)
        return set_fusion_only_trainable(
            model, fusion_only=phase == "fusion", freeze_encoders=frozen
        )

    return single_net if phase in ("global", "local") else fused


def _consumer(phases, index: int):
    """The phase whose model is built from the weights of `phases[index]` (None: none).

    GlobalNet and LocalNet pass theirs to the first fused phase after them, and
    "fusion" to "joint"; a phase after it that has started holds them already.
    """
    for later in phases[index + 1 :]:
        if NETWORK_OF_PHASE[later] == "fused":
            return later
    return None


def _steps(cfg: SegmentConfig, phase: str, n_images: int) -> int:
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    batch = training.global_batch_size(cfg.train)
    if phase == "global":
        return max(1, math.ceil(n_images / batch))
    return max(1, cfg.patches_per_epoch // batch)


def _train_data(phase, photos, sizes, cfg, steps, start, epochs):
    seed = cfg.train.seed
    batch = training.global_batch_size(cfg.train)  # --batch-size is per replica
    common = dict(seed=seed, start_epoch=start, epochs=epochs)
    if phase == "global":
        return global_dataset(photos, batch, steps, augment=cfg.augment, **common)
    if phase == "local":
        return patch_dataset(
            photos.examples,
            sizes.patch_size,
            batch,
            steps,
            pos_fraction=cfg.pos_fraction,
            augment=cfg.augment,
            **common,
        )
    augment = "none" if cfg.augment == "none" else "rot90"
    return fused_dataset(
        photos,
        sizes.patch_size,
        batch,
        steps,
        pos_fraction=cfg.pos_fraction,
        augment=augment,
        **common,
    )


def _compile_arguments(phase, cfg: SegmentConfig):
    # No Keras AUC metric: over every pixel of every batch it costs more than a
    # small U-Net's step; the validation callback measures AUPR on whole images.
    lg = cfg.local_global
    if phase in ("global", "local"):
        return dict(loss=WeightedBCE(cfg.gamma), compile_kwargs=None)
    return dict(
        loss={"global": WeightedBCE(cfg.gamma), "local": WeightedBCE(cfg.gamma)},
        compile_kwargs={"loss_weights": {"global": lg.lambda_global, "local": lg.lambda_local}},
    )


def run_metadata(
    cfg: SegmentConfig,
    sizes: Sizes,
    network: str,
    centre_crop: bool,
    train_records=(),
    val_records=(),
    encoders: EncoderSetup | None = None,
) -> dict:
    """The metadata of a local-global run (rmib.json and inside every saved model).

    With backbone encoders it also says which ("encoder", "backbone", "cbam",
    "encoder_weights", "encoder_nets", "encoder_frozen"); "encoder_nets" is
    [] for the paper's plain U-Nets.
    """
    lg = cfg.local_global
    encoder_info = encoders.info if encoders else {"encoder_nets": []}
    return {
        "task": "segment",
        "model": "local-global",
        "network": network,
        "lesion": cfg.lesion,
        "preprocessing": Preprocessing(method=cfg.preprocessing, centre_crop=centre_crop).to_dict(),
        "global_size": sizes.global_size,
        "patch_size": sizes.patch_size,
        "depths": sizes.depths,
        "base_filters": sizes.base_filters,
        "max_filters": sizes.max_filters,
        "fusion_filters": sizes.fusion_filters,
        "phases": list(lg.phases),
        "loss": "weighted-bce",
        "gamma": cfg.gamma,
        "lambdas": [lg.lambda_global, lg.lambda_local, lg.lambda_l2],
        "predict_tile": sizes.patch_size,
        "predict_overlap": cfg.predict_overlap,
        "predict_batch": cfg.predict_batch,
        **tta_metadata(cfg),
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
        **encoder_info,
    }


def train(cfg: SegmentConfig, train_records, val_records, run, resume: bool = False) -> dict:
    """Train the fused local-global U-Net of Yan et al. (ISBI 2019) in its phases.

    Runs the phases of `cfg.local_global.phases` in order, each one
    `rmib.training.TrainingJob.fit` call in `run` (phase files, resumable), validating
    every `cfg.val_every` epochs on the held-out whole photographs as
    `rmib predict` would (`rmib.evaluation.WholeImageValidation`). The last
    phase writes `model.keras` with the run's metadata (task "segment",
    model "local-global", network, lesion, preprocessing, global_size,
    patch_size, depths, base_filters, encoder_nets ...), which `rmib.load_segmenter`
    turns into a `LocalGlobalSegmenter`.

    Args:
        cfg: the segment configuration (`cfg.local_global` holds this method's settings).
        train_records, val_records: `Record`s annotated for `cfg.lesion`.
        run: the `rmib.training.RunDirectory`.
        resume: continue an interrupted run (finished phases are skipped).

    Returns:
        Validation metrics of the final model over the held-out whole
        photographs ("aupr" pooled and streaming, and the pixel metrics at
        0.5, as `rmib.evaluation.evaluate_examples`); {} without validation
        images or when a callback stopped a phase before its end.

    Raises:
        RmibError: no readable training image, sizes the U-Nets cannot take,
            a bad encoder (`encoder_setup`), a run directory that already
            holds a run without `resume`, and the errors of `rmib.training.fit`.
    """
    from rmib.evaluation import evaluate_examples

    lg = cfg.local_global
    job = training.TrainingJob(run, cfg.train, resume=resume, phases=lg.phases)
    run = job.run
    encoders = encoder_setup(cfg)
    sizes = resolve_sizes(cfg)
    cache = PreprocessedCache(cfg.cache_dir or None)
    train_photos = load_photographs(train_records, cfg, sizes.global_size, cache, job.problems)
    val_photos = load_photographs(val_records, cfg, sizes.global_size, cache, job.problems)
    if not train_photos.examples:
        raise RmibError("no training image could be read")
    centre_crop = train_photos.cropped > 0
    # Only the chief of a multi-worker run writes the run directory itself.
    if job.chief and not run.config_path.exists():
        run.write_config(cfg)

    trained: dict = {}
    for index, phase in enumerate(lg.phases):
        consumer = _consumer(lg.phases, index)
        if resume and consumer and run.checkpoint_path("last", consumer).is_file():
            continue  # finished, and the phase built from its weights already started
        network = NETWORK_OF_PHASE[phase]
        metadata = run_metadata(
            cfg, sizes, network, centre_crop, train_records, val_records, encoders
        )
        phase_cfg = phase_config(cfg, phase, validate=bool(val_photos.examples))
        steps = _steps(cfg, phase, len(train_photos.examples))
        start = job.start_epoch(phase)
        train_ds = _train_data(phase, train_photos, sizes, cfg, steps, start, phase_cfg.epochs)
        trained[phase] = job.fit(
            _phase_model_builder(phase, sizes, lg.lambda_l2, trained, encoders),
            train_ds,
            config=phase_cfg,
            metadata=metadata,
            phase=phase,
            validation=job.validation(
                val_photos.examples,
                lambda m, metadata=metadata: LocalGlobalSegmenter(m, metadata),
                every=cfg.val_every,
                epochs=phase_cfg.epochs,
            ),
            steps_per_epoch=steps,
            **_compile_arguments(phase, cfg),
        )
        final_metadata = metadata  # the network of the phase the run ends with
        if not job.running:
            break

    if not val_photos.examples:
        return job.finish()
    return job.finish(
        lambda model: evaluate_examples(
            LocalGlobalSegmenter(model, final_metadata), val_photos.examples
        )
    )
