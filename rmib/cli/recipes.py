"""`rmib recipes`: the TOML recipes that ship with rmib, one line each."""

from __future__ import annotations

import click


@click.command("recipes")
@click.option("--paths", is_flag=True, help="Print each recipe's file instead of its summary.")
def recipes(paths):
    """List the recipes `--config NAME` takes, folder by folder, with the first
    sentence of each recipe's leading comment."""
    from rmib.recipes import list_recipes

    found = list_recipes()
    if not found:
        raise click.ClickException("no recipe folders found: this rmib was installed without them")
    width = max(len(recipe.name) for recipe in found)
    folder = None
    for recipe in found:
        if recipe.folder != folder and not paths:
            click.echo(("" if folder is None else "\n") + f"{recipe.folder}/")
        folder = recipe.folder
        click.echo(f"  {recipe.name:<{width}}  {recipe.path if paths else recipe.summary}")
