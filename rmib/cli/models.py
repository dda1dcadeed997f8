"""`rmib pretrain`, `rmib segment`, `rmib predict`, `rmib evaluate`."""

from __future__ import annotations

import json
import pathlib

import click

from rmib import choices
from rmib.cli.options import (
    OUT_DIR,
    RECIPE_FILE,
    TILE_SIDE,
    TensorFlowCommand,
    batch_size_option,
    dry_run_option,
    early_stopping_option,
    max_pixels_option,
    on_bad_option,
    predict_precision_option,
    start_cluster_strategy,
    strategy_option,
    threshold_option,
    time_limit_option,
    tta_option,
    verbose_option,
)

_path = click.Path(path_type=pathlib.Path)
_existing = click.Path(exists=True, path_type=pathlib.Path)


def train_options(func):
    """Flags of the one training runner, shared by every training command."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), help="Training epochs."),
        batch_size_option,
        click.option("--lr", "learning_rate", type=float, help="Initial learning rate."),
        click.option("--optimizer", type=click.Choice(choices.OPTIMIZERS), help="Optimizer."),
        click.option(
            "--weight-decay-mode",
            type=click.Choice(choices.WEIGHT_DECAY_MODES),
            help="coupled: wd*w added to the gradient (PyTorch SGD, Dual2Net's default); "
            "decoupled: Keras' weight_decay.",
        ),
        click.option("--lr-schedule", type=click.Choice(choices.LR_SCHEDULES), help="LR schedule."),
        click.option(
            "--precision",
            type=click.Choice(choices.PRECISIONS),
            help="auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with bf16, else float32.",
        ),
        strategy_option,
        click.option("--seed", type=int, help="Random seed."),
        click.option(
            "--deterministic/--no-deterministic", default=None, help="Deterministic TF ops."
        ),
        early_stopping_option,
        time_limit_option,
        click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint."),
        click.option(
            "--config",
            "config_path",
            type=RECIPE_FILE,
            help="A TOML recipe file or a recipe name (`rmib recipes`); flags override it.",
        ),
        dry_run_option,
        verbose_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


_TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "optimizer",
    "weight_decay_mode",
    "lr_schedule",
    "precision",
    "strategy",
    "seed",
    "deterministic",
    "early_stopping_patience",
    "time_limit",
    "class_weights",  # pretrain's --class-weights; None (unset) on the other commands
)


def _overrides(kwargs, keys):
    out = {}
    for key in keys:
        value = kwargs.get(key)
        if isinstance(value, tuple):
            value = [str(v) for v in value] or None
        elif isinstance(value, pathlib.Path):
            value = str(value)
        out[key] = value
    for key in _TRAIN_KEYS:
        out[f"train.{key}"] = kwargs.get(key)
    return out


@click.command(cls=TensorFlowCommand)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
    help="Dataset root (repeatable: Messidor and Kaggle together).",
)
@click.option("--backbone", type=click.Choice(choices.BACKBONES), help="Backbone [vgg16].")
@click.option("--cbam/--no-cbam", default=None, help="Add CBAM attention.")
@click.option(
    "--cbam-init",
    type=click.Choice(choices.CBAM_INITS),
    help="CBAM's start: near-identity gate, or Keras' default kernels and zero biases [identity].",
)
@click.option("--image-size", type=click.IntRange(min=32), help="Input side in pixels [480].")
@click.option("--weights", type=str, help="none | imagenet | PATH to a weights file [none].")
@click.option("--val-fraction", type=float, help="Stratified validation fraction [0.2].")
@click.option(
    "--class-weights/--no-class-weights",
    default=None,
    help="Weight the loss by inverse class frequency, so that healthy and lesion "
    "photographs count alike [off; on in the pretrain/ recipes].",
)
@click.option("--cache-dir", type=_path, help="Keep preprocessed images here (memory-mapped).")
@click.option("--out", type=OUT_DIR, help="Run directory.")
@train_options
@on_bad_option
@max_pixels_option
def pretrain(config_path, resume, on_bad, dry_run, **kwargs):
    """Train a VGG16 / ResNet50 (+CBAM) lesion / healthy classifier (stage 1)."""
    from rmib.config import load_config
    from rmib.methods.classifier.config import PretrainConfig
    from rmib.tasks import run_pretrain

    overrides = _overrides(
        kwargs,
        (
            "data",
            "backbone",
            "cbam",
            "cbam_init",
            "image_size",
            "weights",
            "val_fraction",
            "cache_dir",
            "out",
        ),
    )
    overrides["on_bad"] = on_bad
    cfg = load_config(PretrainConfig, config_path, overrides)
    start_cluster_strategy(cfg.train.strategy)
    run_pretrain(cfg, resume=resume, dry_run=dry_run)


@click.command(cls=TensorFlowCommand)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
    help="Dataset root with lesion masks (repeatable).",
)
@click.option(
    "--lesion",
    type=click.Choice(choices.LESIONS),
    help="Lesion type; required unless the --config recipe sets `lesion`.",
)
@click.option(
    "--model",
    type=click.Choice(choices.SEGMENT_MODELS),
    help="Segmentation method [encoder-decoder].",
)
@click.option(
    "--encoder",
    type=str,
    help="A `rmib pretrain` run directory (its encoder is transferred, frozen), or "
    "vgg16 | resnet50 to build one from --weights (local-global: the encoder of GlobalNet "
    "and LocalNet, see --encoder-nets). Encoder-decoder without it: vgg16 from scratch "
    "(random init, trainable), as the first line of output says.",
)
@click.option("--cbam/--no-cbam", default=None, help="With a backbone name: add CBAM.")
@click.option("--weights", type=str, help="With a backbone name: none | imagenet | PATH.")
@click.option(
    "--fine-tune-after",
    type=click.IntRange(min=0),
    help="Unfreeze the encoder after N epochs, at a 10x lower learning rate.",
)
@click.option(
    "--patch-size",
    type=click.IntRange(min=32),
    help="Training patch side: a multiple of 32 (encoder-decoder) or of 2**depth "
    "(local-global) [160].",
)
@click.option(
    "--scale",
    type=float,
    help="Encoder-decoder: working resolution in (0, 1], e.g. 0.5: photographs and masks "
    "are resized by it for training, and predict/evaluate resize back to full size [1].",
)
@click.option("--patches-per-epoch", type=click.IntRange(min=1), help="Patches per epoch [512].")
@click.option(
    "--loss",
    type=click.Choice(choices.SEGMENT_LOSSES),
    help="Loss [bce].",
)
@click.option("--val-fraction", type=float, help="Whole images held out for validation [0.2].")
@click.option("--val-names", multiple=True, help="Hold out these images (by name) instead.")
@click.option(
    "--image-size",
    "dual2net_image_size",
    nargs=2,
    type=int,
    default=None,
    help="Dual2Net: HEIGHT WIDTH of the resized photograph [960 1440].",
)
@click.option(
    "--global-size", type=click.IntRange(min=32), help="Local-global: GlobalNet input [640]."
)
@click.option(
    "--base-filters", type=click.IntRange(min=1), help="Local-global: U-Net base width [32]."
)
@click.option("--phases", type=str, help="Local-global: comma-separated phases to run.")
@click.option(
    "--epochs-per-phase", type=click.IntRange(min=1), help="Local-global: epochs per phase."
)
@click.option(
    "--encoder-nets",
    type=str,
    help="Local-global: which nets take --encoder: global,local | global | local "
    "[both with --encoder; plain U-Nets without].",
)
@click.option(
    "--predict-tile",
    type=TILE_SIDE,
    help="Tile side for whole-image validation and prediction: 'auto' (large tiles over the "
    "field of view) or a multiple of 32 [auto].",
)
@tta_option(
    " of the whole-image validation, and the run's default for predict, evaluate, export", "[none]"
)
@click.option(
    "--variant",
    type=click.Choice(choices.DUAL2NET_VARIANTS),
    help="Dual2Net: the paper's ablation variants [dual-dsm].",
)
@click.option(
    "--output-stride",
    type=click.Choice([str(s) for s in choices.OUTPUT_STRIDES]),
    help="Dual2Net: the encoder's output stride (ResNet50 8 | 16 | 32, VGG16 32) "
    "[8 for ResNet50, as the paper; 32 for VGG16].",
)
@click.option("--cache-dir", type=_path, help="Keep preprocessed images here (memory-mapped).")
@click.option("--out", type=OUT_DIR, help="Run directory.")
@train_options
@on_bad_option
@max_pixels_option
def segment(
    config_path,
    resume,
    on_bad,
    dry_run,
    dual2net_image_size,
    global_size,
    base_filters,
    phases,
    epochs_per_phase,
    encoder_nets,
    variant,
    output_stride,
    **kwargs,
):
    """Train a lesion segmenter on patches.

    The RMIB paper's stage 2 is `--encoder RUN` (a `rmib pretrain` run): its
    encoder is transferred and frozen. Without --encoder (flag or recipe) the
    encoder-decoder is VGG16 from scratch; the first line of output names the
    encoder used.
    """
    from rmib.config import load_config
    from rmib.methods.segment_config import SegmentConfig
    from rmib.tasks import run_segment

    config_path = _resumed_config(resume, kwargs.get("out"), config_path)
    _require_lesion(kwargs.get("lesion"), config_path)
    overrides = _overrides(
        kwargs,
        (
            "data",
            "lesion",
            "model",
            "encoder",
            "cbam",
            "weights",
            "fine_tune_after",
            "patch_size",
            "scale",
            "patches_per_epoch",
            "predict_tile",
            "tta",
            "loss",
            "val_fraction",
            "val_names",
            "cache_dir",
            "out",
        ),
    )
    overrides["on_bad"] = on_bad
    overrides["dual2net.image_size"] = list(dual2net_image_size) if dual2net_image_size else None
    overrides["local_global.global_size"] = global_size
    overrides["local_global.base_filters"] = base_filters
    overrides["local_global.phases"] = (
        [p.strip() for p in phases.split(",") if p.strip()] if phases else None
    )
    overrides["local_global.epochs_per_phase"] = epochs_per_phase
    overrides["local_global.encoder_nets"] = (
        [n.strip() for n in encoder_nets.split(",") if n.strip()] if encoder_nets else None
    )
    overrides["dual2net.variant"] = variant
    overrides["dual2net.output_stride"] = int(output_stride) if output_stride else None
    cfg = load_config(SegmentConfig, config_path, overrides)
    if kwargs.get("encoder") and cfg.model == "local-global" and not cfg.local_global.encoder_nets:
        # An encoder asked for on the command line is meant for both nets, even
        # a backbone name (which SegmentConfig's default alone does not select).
        cfg.local_global.encoder_nets = ["global", "local"]
    start_cluster_strategy(cfg.train.strategy)
    run_segment(cfg, resume=resume, dry_run=dry_run)


def _resumed_config(resume, out, config_path):
    """`--resume --out RUN` without `--config` continues RUN with its own settings.

    The run's config.toml (written when it started) is then the recipe, and the
    flags given still override it; with `--config` the recipe given is used.
    """
    if resume and config_path is None and out is not None:
        saved = pathlib.Path(out) / "config.toml"
        if saved.is_file():
            return saved
    return config_path


def _require_lesion(lesion, config_path):
    """`rmib segment` trains the lesion it is told to: the flag's or the recipe's, never a default."""
    from rmib.config import read_toml
    from rmib.errors import RmibError

    if lesion is None and (config_path is None or "lesion" not in read_toml(config_path)):
        raise RmibError(
            'which lesion? pass --lesion EX|HE|MA|SE, or set lesion = "EX" (HE, MA, SE) '
            "in the --config recipe"
        )


def _model_options(func):
    for option in reversed(
        [
            click.option(
                "--lesion",
                type=click.Choice(choices.LESIONS),
                help="Override the lesion type stored in the model.",
            ),
            click.option(
                "--tile",
                type=TILE_SIDE,
                help="Tile side for tiled models, or 'auto': the fewest large tiles over "
                "the field of view (encoder-decoder; its default for new runs).",
            ),
            click.option(
                "--overlap",
                type=float,
                help="Overlap fraction in [0, 1) of fixed tiles (--tile N).",
            ),
            click.option(
                "--halo",
                type=click.IntRange(min=0),
                help="With --tile auto: pixels of context each tile keeps around what it "
                "predicts (tiles overlap by twice this) [64].",
            ),
            click.option(
                "--max-tile",
                type=click.IntRange(min=32),
                help="With --tile auto: the largest tile side; tiles hold at most its square "
                "in pixels (memory, and the context the model sees) [1024].",
            ),
            click.option(
                "--tile-batch", "batch_size", type=click.IntRange(min=1), help="Tiles per batch."
            ),
            tta_option("", "[the run's choice, else none]"),
            threshold_option,
            click.option(
                "--unsafe-load",
                is_flag=True,
                help="Allow model files with Lambda layers (runs code from the file).",
            ),
            predict_precision_option,
        ]
    ):
        func = option(func)
    return func


def _segmenter(
    model, *, lesion, tile, overlap, halo, max_tile, batch_size, unsafe_load, precision, tta
):
    """The Segmenter of MODEL with the options of `_model_options` (threshold aside)."""
    from rmib import training
    from rmib.inference import TilingOptions
    from rmib.inference.tta import transforms
    from rmib.tasks import load_segmenter
    from rmib.training.devices import resolve_predict_precision

    # TilingOptions checks --overlap before the model is loaded.
    tiling = TilingOptions(
        tile=tile, overlap=overlap, batch_size=batch_size, halo=halo, max_tile=max_tile
    )
    trained = training.read_run_metadata(model).get("precision")
    resolved, reason = resolve_predict_precision(precision, trained)
    click.echo(f"precision {resolved}: {reason}")
    segmenter = load_segmenter(
        model, unsafe=unsafe_load, tiling=tiling, lesion=lesion, precision=resolved, tta=tta
    )
    if segmenter.tta != "none":
        click.echo(f"tta {segmenter.tta}: {len(transforms(segmenter.tta))} passes a photograph")
    return segmenter


@click.command(cls=TensorFlowCommand)
@click.argument("model", type=_existing)
@click.argument("images", nargs=-1, required=True, type=_path)
@click.option("--out", type=OUT_DIR, required=True, help="Output folder.")
@_model_options
@on_bad_option
@max_pixels_option
def predict(model, images, out, threshold, on_bad, **model_options):
    """Segment whole photographs: probability map (16-bit PNG), mask and overlay per image.

    MODEL is a run directory or a .keras file; IMAGES are files or folders.
    OUT gets <stem>_prob.png, <stem>_mask.png and <stem>_overlay.png per
    photograph, and predictions.csv: input, output files, lesion pixels and
    mean probability of each. Photographs sharing a stem (a/photo.jpg,
    b/photo.png) are numbered (photo-1, photo-2; predictions.csv says which
    is which) instead of overwriting each other; files in OUT named like
    these outputs are never read as photographs.
    """
    from rmib.predict import predict_files

    segmenter = _segmenter(model, **model_options)
    done, skipped = predict_files(segmenter, images, out, threshold=threshold, on_bad=on_bad)
    click.echo(
        f"{len(done)} image(s) predicted -> {out} (predictions.csv)"
        + (f"; {len(skipped)} skipped (skipped.csv)" if skipped else "")
    )


@click.command(cls=TensorFlowCommand)
@click.argument("model", type=_existing)
@click.option(
    "--data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
    help="Dataset root with masks of the model's lesion (repeatable).",
)
@click.option("--out", type=OUT_DIR, required=True, help="Output folder.")
@click.option("--split", type=str, help="Only images of this split of the dataset (e.g. test).")
@click.option("--names", multiple=True, help="Only these images (by name).")
@click.option("--fov-only", is_flag=True, help="Count only pixels inside the field of view.")
@click.option("--no-overlays", is_flag=True, help="Do not write comparison overlays.")
@_model_options
@on_bad_option
@max_pixels_option
def evaluate(
    model,
    data,
    out,
    split,
    names,
    fov_only,
    no_overlays,
    threshold,
    on_bad,
    **model_options,
):
    """Evaluate a segmenter on whole photographs: AUPR, pixel and region-level scores."""
    from rmib.predict import evaluate_dataset

    segmenter = _segmenter(model, **model_options)
    result = evaluate_dataset(
        segmenter,
        data,
        out,
        lesion=model_options["lesion"],
        threshold=threshold,
        fov_only=fov_only,
        split=split,
        names=names,
        on_bad=on_bad,
        overlays=not no_overlays,
    )
    shown = {k: v for k, v in result.items() if isinstance(v, float)}
    click.echo(
        json.dumps(
            {"images": result["images"], **shown, "region_f_score": result["region_f_score"]},
            indent=2,
        )
    )
    click.echo(f"-> {out}/metrics.json, per_image.csv, pr_curve.png")
