"""Options shared by several commands, declared once."""

from __future__ import annotations

import pathlib

import click

from rmib import choices, io

on_bad_option = click.option(
    "--on-bad",
    type=click.Choice(choices.ON_BAD),
    default="error",
    show_default=True,
    help="error: stop at the first bad file with its name; skip: go on, list it in skipped.csv.",
)


batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Images (patches) per step on each replica (GPU, TPU core or worker); "
    "a step trains on this x replicas in all.",
)


def _set_max_pixels(ctx, param, value):
    io.set_max_pixels(value)
    return value


max_pixels_option = click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=io.DEFAULT_MAX_PIXELS,
    show_default=True,
    expose_value=False,
    callback=_set_max_pixels,
    help="Refuse images with more pixels than this, before decoding them.",
)

predict_precision_option = click.option(
    "--precision",
    type=click.Choice(choices.PREDICT_PRECISIONS),
    default="float32",
    show_default=True,
    help="What the model computes in: float32 (exact, portable); auto: mixed_float16 on a GPU, "
    "mixed_bfloat16 on a CPU with native bfloat16 (faster, can cost accuracy); training: the "
    "precision the run was trained in.",
)


def tta_option(what: str, default: str):
    """`--tta`, test-time flips; `what` they apply to (after "augmentation"), `default` in brackets."""
    return click.option(
        "--tta",
        type=click.Choice(choices.TTA),
        help=f"Test-time augmentation{what}: flips averages the maps of the photograph and its "
        "horizontal, vertical and double flips (4 forward passes: about 4x the time); "
        "flips-rot90 also those of the photograph turned a quarter (8 passes, 8x; not for "
        f"a non-square Dual2Net input) {default}.",
    )


# An output folder: click refuses an existing file with one line ("Directory ... is a file").
OUT_DIR = click.Path(file_okay=False, path_type=pathlib.Path)

threshold_option = click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Probability threshold of the binary mask, in (0, 1).",
)

data_root_argument = click.argument(
    "root", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path)
)


class TileSide(click.ParamType):
    """A tile side for whole-image prediction: "auto" or a number of pixels (>= 32)."""

    name = "auto|PIXELS"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() != "auto":
            try:
                side = int(value)
            except (TypeError, ValueError):
                self.fail(f"expected 'auto' or a number of pixels, got {value!r}", param, ctx)
            if side < 32:
                self.fail(f"a tile side must be at least 32 pixels, got {side}", param, ctx)
            return side
        return "auto"


TILE_SIDE = TileSide()


# The runner's options that every training command takes (rmib.config.TrainConfig).
strategy_option = click.option(
    "--strategy",
    type=click.Choice(choices.STRATEGIES),
    help="tf.distribute strategy (auto: mirrored when several GPUs are visible; "
    "multiworker: the machines in TF_CONFIG; tpu: the TPU found).",
)

early_stopping_option = click.option(
    "--early-stopping",
    "early_stopping_patience",
    type=click.IntRange(min=0),
    help="Stop after N epochs without improvement (0 = off).",
)

time_limit_option = click.option(
    "--time-limit",
    type=click.FloatRange(min=0),
    help="Minutes of training: stop after the last epoch that fits (0 = no limit).",
)


def start_cluster_strategy(name: str) -> None:
    """Multi-worker and TPU strategies must exist before TensorFlow runs anything."""
    if name in ("multiworker", "tpu"):
        from rmib import training

        training.get_strategy(name)


class RecipeFile(click.ParamType):
    """`--config`: a TOML file, or the name of a shipped recipe ("vgg16_cbam"; `rmib recipes`)."""

    name = "FILE|RECIPE"

    def convert(self, value, param, ctx):
        path = pathlib.Path(value)
        if path.is_file():
            return path
        if path.exists():
            self.fail(f"{value!r} is a folder: expected a TOML file or a recipe name", param, ctx)
        if len(path.parts) > 2:
            self.fail(f"file {value!r} does not exist", param, ctx)
        from rmib.errors import RmibError
        from rmib.recipes import find_recipe

        try:
            return find_recipe(value)
        except RmibError as exc:
            self.fail(str(exc), param, ctx)


RECIPE_FILE = RecipeFile()
# --------------------------------------------------------------------------- what is printed


def _set_verbosity(ctx, param, value):
    from rmib.console import set_training_verbosity

    set_training_verbosity(value)
    return value


verbose_option = click.option(
    "--verbose",
    type=click.IntRange(0, 2),
    metavar="0|1|2",
    expose_value=False,
    callback=_set_verbosity,
    help="Training progress: 0 nothing, 1 Keras' progress bar, 2 one line per epoch "
    "[1 on a terminal, 2 when the output is a file or a pipe].",
)

dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything, print the resolved configuration, the data found and the run "
    "directory, and exit without writing anything.",
)


class TensorFlowCommand(click.Command):
    """A command that runs TensorFlow: it takes `--tf-log`, and without it TensorFlow
    starts quietly (`rmib.console.import_tensorflow_quietly`) once the command line
    has been checked, so a refused command line costs no TensorFlow start-up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--tf-log"],
                is_flag=True,
                expose_value=False,
                callback=_remember_tf_log,
                help="Show TensorFlow's own log (start-up lines, device probing), "
                "filtered out by default.",
            )
        )

    def invoke(self, ctx):
        from rmib.console import import_tensorflow_quietly

        import_tensorflow_quietly(show_log=ctx.meta.get("rmib.tf_log", False))
        return super().invoke(ctx)


def _remember_tf_log(ctx, param, value):
    ctx.meta["rmib.tf_log"] = value
    return value
