"""`rmib data unpack-idrid`: IDRiD's downloaded archives into the layout its reader expects."""

from __future__ import annotations

import pathlib

import click

from rmib.cli.options import OUT_DIR


@click.command("unpack-idrid")
@click.argument(
    "archives", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path)
)
@click.option("--out", required=True, type=OUT_DIR, help="The dataset folder to write.")
def unpack_idrid(archives, out):
    """Unpack IDRiD's downloaded archives into OUT, the folder to give --data.

    ARCHIVES are the .zip files of IDRiD's page (it needs a login): "A.
    Segmentation.zip" and "B. Disease Grading.zip", or one archive holding their
    folders. Each part is written whole or not at all; parts already unpacked
    are skipped; C. Localization is not read by rmib and is skipped.
    """
    from rmib.data.archives import unpack_idrid as unpack

    written = unpack(archives, out, echo=click.echo)
    click.echo(f"{out}: {', '.join(written) or 'nothing new'}; read it with --data {out}")
