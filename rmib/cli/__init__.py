"""The `rmib` command line: a click group; each command hands off to the library."""

from __future__ import annotations

import sys

import click

from rmib import __version__
from rmib.errors import RmibError


class _Group(click.Group):
    """Prints user errors (RmibError and friends) as one line, no traceback, exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RmibError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)
        except (
            FileExistsError,
            FileNotFoundError,
            IsADirectoryError,
            NotADirectoryError,
            PermissionError,
        ) as exc:
            name = exc.filename or ""
            click.echo(f"Error: {name}: {exc.strerror or exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rmib")
def cli():
    """rmib: transfer learning for retinal fundus images.

    Pretrain a lesion classifier, turn its encoder into lesion segmenters,
    run the published local-global U-Net, Dual2Net and patch-grid grader,
    predict whole photographs, evaluate and export.
    """


def _register():
    from rmib.cli import data, export, grade, models, recipes, unpack

    cli.add_command(data.data)
    data.data.add_command(unpack.unpack_idrid)
    for command in (models.pretrain, models.segment, models.predict, models.evaluate):
        cli.add_command(command)
    cli.add_command(grade.grade)
    cli.add_command(export.export)
    cli.add_command(recipes.recipes)


_register()


def reference_markdown() -> str:
    """The CLI reference (docs/CLI.md), generated from every command's --help."""
    lines = [
        "# rmib command-line reference",
        "",
        "Generated from `--help` by `make docs`; do not edit by hand.",
        "",
    ]

    def walk(command, path, parent=None):
        # The parent chain and context settings make each page what `--help` shows
        # (``-h`` included), whatever click has cached from earlier invocations.
        ctx = click.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
        lines.extend(
            [f"## `{' '.join(path)}`", "", "```", command.get_help(ctx).rstrip(), "```", ""]
        )
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name], ctx)

    walk(cli, ["rmib"])
    return "\n".join(lines)


def main(argv=None):
    # TensorFlow's log level is set by the commands that start it (--tf-log).
    return cli.main(args=argv, prog_name="rmib")


if __name__ == "__main__":
    sys.exit(main())
