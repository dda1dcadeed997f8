"""`rmib export`: a trained model as a SavedModel, a `.keras` file or TFLite."""

from __future__ import annotations

import pathlib

import click

from rmib import choices
from rmib.cli.options import TensorFlowCommand


@click.command(cls=TensorFlowCommand)
@click.argument("model", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option(
    "--format",
    "export_format",
    type=click.Choice(choices.EXPORT_FORMATS),
    default="savedmodel",
    show_default=True,
    help="savedmodel: TensorFlow SavedModel with named signatures; keras: a copy of the "
    ".keras file; tflite: the batch signature (classify, segment_patch or segment_resized) "
    "for TFLite.",
)
@click.option(
    "--out", type=click.Path(path_type=pathlib.Path), required=True, help="Where to write it."
)
@click.option(
    "--check",
    is_flag=True,
    help="Reload the export and compare it with what rmib predict / rmib grade predict "
    "compute in the same precision (max abs difference < 1e-4 in float32, 2**-7 in "
    "bfloat16, 2**-10 in float16).",
)
@click.option(
    "--tile",
    type=click.IntRange(min=1),
    help="Tile side of segment_image (tiled segmenters); default what rmib predict uses.",
)
@click.option(
    "--overlap",
    type=float,
    help="Tile overlap of segment_image, in [0, 1) (tiled segmenters).",
)
@click.option(
    "--unsafe-load",
    is_flag=True,
    help="Allow model files with Lambda layers (runs code from the file).",
)
@click.option(
    "--precision",
    type=click.Choice(choices.PREDICT_PRECISIONS),
    help="What the SavedModel or TFLite graph computes in [float32: portable, as exact as the "
    "weights]; auto: the fast precision of this machine; training: the run's own; "
    "mixed_float16 is allowed without a GPU (for a GPU server; --check is slow then). "
    "A .keras copy keeps the run's own precision.",
)
def export(model, export_format, out, check, tile, overlap, unsafe_load, precision):
    """Export MODEL (a run directory or a .keras file) for serving without rmib.

    Classifiers, every segmenter (encoder-decoder, local-global U-Net,
    Dual2Net) and graders (the run directory of rmib grade train; SavedModel
    only). The SavedModel's signatures, their inputs and outputs and the
    preprocessing the caller applies are in OUT/assets/rmib.json.
    """
    from rmib.tasks import export_model

    _check_out(out, export_format)
    result = export_model(
        model,
        out,
        export_format,
        check=check,
        unsafe=unsafe_load,
        tile=tile,
        overlap=overlap,
        precision=precision,
    )
    click.echo(f"precision {result.precision}: {_precision_reason(precision, result)}")
    names = f" (signatures: {', '.join(result.signatures)})" if result.signatures else ""
    click.echo(f"Exported {result.format} -> {result.path}{names}")
    for name, difference in result.differences.items():
        click.echo(
            f"check {name}: max abs difference {difference:.3g} "
            f"(< {result.tolerance:g}, the tolerance of {result.precision}) OK"
        )


def _check_out(out: pathlib.Path, export_format: str) -> None:
    """Refuse an --out the export would destroy: a file for a folder, or a folder of other files."""
    if export_format != "savedmodel":
        if out.is_dir():
            raise click.BadParameter(
                f"{out} is a folder; --format {export_format} writes a file", param_hint="'--out'"
            )
        return
    if out.is_file():
        raise click.BadParameter(
            f"{out} is a file; --format savedmodel writes a folder", param_hint="'--out'"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").is_file():
        raise click.BadParameter(
            f"{out} holds files and no SavedModel; the export would replace the whole folder: "
            "choose a new or empty folder",
            param_hint="'--out'",
        )


def _precision_reason(asked, result) -> str:
    if result.format == "keras":
        return "a .keras copy computes in the precision it was trained in"
    if asked is None:
        return "the default of exports (portable to every runtime)"
    from rmib.training.devices import resolve_predict_precision

    trained = result.metadata.get("trained_precision")
    return resolve_predict_precision(asked, trained, allow_slow=True)[1]
