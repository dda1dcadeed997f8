"""`rmib grade ...`: the patch-grid DR grader of Yang et al., MICCAI 2017."""

from __future__ import annotations

import pathlib

import click

from rmib import choices
from rmib.cli.options import (
    OUT_DIR,
    RECIPE_FILE,
    TensorFlowCommand,
    dry_run_option,
    early_stopping_option,
    max_pixels_option,
    on_bad_option,
    start_cluster_strategy,
    strategy_option,
    time_limit_option,
    verbose_option,
)

GLOBAL_NETS = choices.GLOBAL_NETS
SPLITS = choices.EVALUATION_SPLITS

_existing_dir = click.Path(exists=True, file_okay=False, path_type=pathlib.Path)


def _progress(items, label):
    items = list(items)
    with click.progressbar(items, label=label, file=click.get_text_stream("stderr")) as bar:
        yield from bar


@click.group()
def grade():
    """Grade DR severity with the two-stage patch-grid grader (Yang et al., MICCAI 2017).

    A local net labels the patches of an overlapping grid (normal, MA,
    haemorrhage, exudate); their labels and probabilities weight the image,
    and a global net grades the weighted lesion map.
    """


@grade.command("train", cls=TensorFlowCommand)
@click.option(
    "--data",
    "data",
    multiple=True,
    type=_existing_dir,
    help="Dataset root (repeat). Patches come from images with MA/HE/EX masks, grades "
    "from graded images; they may be different trees. Default: the recipe's data.",
)
@click.option("--out", required=True, type=OUT_DIR, help="The run directory to write.")
@click.option(
    "--config",
    "config_path",
    type=RECIPE_FILE,
    help="A TOML recipe file or name (e.g. idrid_yang2017; `rmib recipes`); flags override it.",
)
@click.option("--image-size", type=int, help="Side the photograph is padded and resized to [800].")
@click.option("--patch-size", type=int, help="Grid patch side h in pixels [64].")
@click.option("--overlap", type=int, help="Pixels shared by neighbouring patches, ov [32].")
@click.option("--min-pixels", type=int, help="Fewest mask pixels for a lesion patch [3].")
@click.option(
    "--grades",
    type=click.Choice([str(n) for n in choices.GRADE_COUNTS]),
    help="4 NPDR grades (grade-4 images left out, as the paper) or 5 with PDR [4].",
)
@click.option("--global-net", type=click.Choice(GLOBAL_NETS), help="Global network [yang].")
@click.option("--global-size", type=int, help="Side of the global net's input [256].")
@click.option("--epochs", type=int, help="Epochs of each global net [30].")
@click.option("--local-epochs", type=int, help="Epochs of the local net [10].")
@click.option("--batch-size", type=int, help="Images per step and replica of the global nets [16].")
@click.option(
    "--local-batch-size", type=int, help="Patches per step and replica of the local net [128]."
)
@click.option(
    "--precision",
    type=click.Choice(choices.PRECISIONS),
    help="Numeric precision [auto].",
)
@click.option("--seed", type=int, help="Random seed of both trainings [42].")
@strategy_option
@early_stopping_option
@time_limit_option
@click.option("--val-fraction", type=float, help="Images held out for validation [0.1].")
@click.option(
    "--no-baseline",
    "no_baseline",
    is_flag=True,
    help="Skip the non-weighted global net (the paper's comparison).",
)
@click.option("--cache-dir", type=OUT_DIR, help="Keep preprocessed photographs here.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@dry_run_option
@verbose_option
@on_bad_option
@max_pixels_option
def train_command(data, out, config_path, resume, dry_run, **flags):
    """Train the local net on mask-labelled patches, then the global net on weighted lesion maps.

    --precision, --seed, --strategy and --early-stopping apply to every phase
    (local net, global net, non-weighted baseline); --time-limit is the whole
    run's: the run stops after the last epoch that fits, and the phases after
    it wait for a --resume with a longer limit.
    """
    from rmib.config import load_config
    from rmib.tasks import GradeConfig, train_grader

    both = ("precision", "seed", "strategy", "early_stopping_patience", "time_limit")
    overrides = {
        "data": [str(p) for p in data] or None,
        "image_size": flags["image_size"],
        "patch_size": flags["patch_size"],
        "overlap": flags["overlap"],
        "min_pixels": flags["min_pixels"],
        "grades": int(flags["grades"]) if flags["grades"] else None,
        "global_net": flags["global_net"],
        "global_size": flags["global_size"],
        "val_fraction": flags["val_fraction"],
        "baseline": False if flags["no_baseline"] else None,
        "cache_dir": str(flags["cache_dir"]) if flags["cache_dir"] else None,
        "on_bad": flags["on_bad"],
        "train.epochs": flags["epochs"],
        "local_train.epochs": flags["local_epochs"],
        "train.batch_size": flags["batch_size"],
        "local_train.batch_size": flags["local_batch_size"],
    }
    for name in both:
        overrides[f"train.{name}"] = flags[name]
        overrides[f"local_train.{name}"] = flags[name]
    cfg = load_config(GradeConfig, config_path, overrides)
    start_cluster_strategy(cfg.train.strategy)
    summary = train_grader(
        cfg, out, resume=resume, echo=click.echo, progress=_progress, dry_run=dry_run
    )
    if dry_run:
        return
    click.echo(f"Wrote the grading run to {out}")
    if summary.get("skipped_files"):
        click.echo(f"{summary['skipped_files']} bad file(s) skipped; see {out / 'skipped.csv'}")


@grade.command("predict", cls=TensorFlowCommand)
@click.argument("run", type=_existing_dir)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=pathlib.Path))
@click.option("--out", required=True, type=OUT_DIR, help="Folder for predictions and maps.")
@click.option(
    "--patch-batch",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Patches per local-net call.",
)
@on_bad_option
@max_pixels_option
def predict_command(run, images, out, patch_batch, on_bad):
    """Grade IMAGES (files or folders) with the grader trained in RUN.

    Prints each image's grade and class probabilities, writes them to
    predictions.csv and a picture of the weighted lesion map beside the
    lesion patches (<image>_lesion_map.png) to --out.
    """
    from rmib.methods.grading.grader import predict_images
    from rmib.predict import collect_images
    from rmib.tasks import load_grader

    grader = load_grader(run, batch_size=patch_batch)
    rows = predict_images(
        grader, collect_images(images), out, on_bad=on_bad, echo=click.echo, progress=_progress
    )
    click.echo(f"Graded {len(rows)} image(s); wrote {out / 'predictions.csv'}")


@grade.command("evaluate", cls=TensorFlowCommand)
@click.argument("run", type=_existing_dir)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=_existing_dir,
    help="Dataset root (repeat).",
)
@click.option("--out", required=True, type=OUT_DIR, help="Folder for metrics and ROC curves.")
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default="auto",
    show_default=True,
    help="auto: the trees' own test split when they have one, else every image.",
)
@click.option(
    "--patch-batch",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Patches per local-net call.",
)
@click.option("--cache-dir", type=OUT_DIR, help="Keep preprocessed photographs here.")
@on_bad_option
@max_pixels_option
def evaluate_command(run, data, out, split, patch_batch, cache_dir, on_bad):
    """Evaluate the grader in RUN on the images of --data.

    Patch level (images with MA/HE/EX masks): per-class recall and
    precision, confusion matrix, lesion-vs-normal ROC AUC. Image level
    (graded images): quadratic weighted kappa, accuracy, any-DR and
    referable-DR ROC AUC, weighted beside non-weighted. Writes metrics.json,
    per_image.csv and ROC curves to --out.
    """
    from rmib.methods.grading.evaluate import evaluate_grader, format_metrics
    from rmib.tasks import load_grader

    grader = load_grader(run, batch_size=patch_batch)
    result = evaluate_grader(
        grader,
        data,
        out,
        split=split,
        on_bad=on_bad,
        cache_dir=cache_dir,
        echo=click.echo,
        progress=_progress,
    )
    click.echo(format_metrics(result))
    click.echo(f"Wrote {out / 'metrics.json'}")
