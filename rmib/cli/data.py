"""`rmib data ...`: look at a dataset folder, or write a synthetic one."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from rmib import LESION_NAMES, choices
from rmib.cli.options import data_root_argument, max_pixels_option
from rmib.data import readers
from rmib.errors import RmibError


@click.group()
def data():
    """Inspect dataset folders and write synthetic ones."""


@data.command("inspect")
@data_root_argument
@click.option(
    "--layout",
    type=click.Choice(choices.DATASET_LAYOUTS, case_sensitive=False),
    default=None,
    help="Dataset layout; detected from the folder when not given.",
)
@click.option("--quick", is_flag=True, help="Only list the files and read image headers.")
@click.option(
    "--on-bad",
    type=click.Choice(choices.ON_BAD),
    default="error",
    show_default=True,
    help="Every bad file is listed either way. error: exit 1 when any is bad; "
    "skip: exit 0 when some images are usable (what a run with --on-bad skip would do).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@max_pixels_option
def inspect_command(root, layout, quick, on_bad, as_json):
    """Count the images, grades and lesion masks of the dataset at ROOT.

    Prints the layout, images per grade, label and lesion type (per split
    when the dataset has splits) and the image sizes seen. Every image and
    mask is decoded (--quick only lists them and reads their headers); each
    bad file is named on its own line and the exit code is 1 (with
    --on-bad skip, 0 while some images are usable).
    """
    dataset = readers.read_dataset(root, layout=layout, on_bad="skip", allow_empty=True)
    summary = readers.summarize_dataset(
        dataset, decode=not quick, progress=None if quick else _progress_bar
    )
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    problems = summary["problems"]
    if not dataset.records and not problems:
        raise RmibError(f"{root}: no images found for the {dataset.layout} layout")
    if problems and (on_bad == "error" or not _usable(dataset, problems)):
        raise RmibError(f"{len(problems)} bad file(s) in {root} (each listed above)")


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option(
    "--layout",
    type=click.Choice(choices.SYNTHETIC_LAYOUTS),
    default="idrid",
    show_default=True,
    help="On-disk layout to write (as the real dataset is distributed).",
)
@click.option("--count", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--size", type=click.IntRange(min=16), default=256, show_default=True, help="Image side."
)
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out, layout, count, size, seed):
    """Write a synthetic fundus dataset of COUNT images to OUT (a new or empty folder)
    in a real layout."""
    from rmib.data import synthetic  # imported here: only this command needs it

    if out.is_dir() and any(out.iterdir()):
        # Its files would replace same-named ones: a real dataset's photographs.
        raise click.BadParameter(
            f"{out} holds files, which same-named synthetic ones would replace; "
            "choose a new or empty folder",
            param_hint="'OUT'",
        )

    path = synthetic.write_dataset(out, layout, count, size, seed)
    dataset = readers.read_dataset(path, layout=layout)
    summary = readers.summarize_dataset(dataset, decode=False)
    click.echo(f"Wrote a synthetic {layout} dataset to {path}")
    click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    """The human-readable report of `readers.summarize_dataset`."""
    lines = [
        f"Dataset: {summary['root']}",
        f"Layout:  {summary['layout']}",
        f"Images:  {summary['images']}",
    ]
    splits = summary["splits"]
    columns = [("all", summary)] + list(splits.items())
    rows = [("images", [c["images"] for _, c in columns])]
    for grade in summary["grades"]:
        rows.append((f"grade {grade}", [c["grades"].get(grade, 0) for _, c in columns]))
    for label in ("healthy", "lesion", "unknown"):
        if label in summary["labels"]:
            rows.append((f"label {label}", [c["labels"].get(label, 0) for _, c in columns]))
    for code in summary["lesions"]:
        name = f"{code} {LESION_NAMES.get(code, '')}".strip()
        cells = []
        for _, c in columns:
            lesion = c["lesions"].get(code, {"images": 0, "annotated": 0})
            cells.append(f"{lesion['images']}/{lesion['annotated']}")
        rows.append((name, cells))
    if len(columns) > 1 or len(rows) > 1:
        width = max(len(r[0]) for r in rows)
        widths = [
            max(len(name), *(len(str(r[1][i])) for r in rows))
            for i, (name, _) in enumerate(columns)
        ]
        lines.append("")
        header = "  ".join(n.rjust(w) for (n, _), w in zip(columns, widths, strict=True))
        lines.append(f"  {'':<{width}}  {header}")
        for name, cells in rows:
            lines.append(
                f"  {name:<{width}}  "
                + "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))
            )
        if summary["lesions"]:
            lines.append("  (lesions: images with a mask file / images annotated for it)")
    for code, counts in summary["lesions"].items():
        empty = counts["images"] - counts.get("nonempty", counts["images"])
        if empty > 0:
            lines.append(f"  {code}: {empty} of its {counts['images']} mask files are all zero")
    lines.append("")
    lines.append("Image sizes (width x height):")
    lines += [f"  {size}: {n}" for size, n in summary["sizes"].items()] or ["  none read"]
    problems = summary["problems"]
    checked = "decoded" if summary["decoded"] else "listed (headers read, not decoded)"
    lines.append("")
    if problems:
        lines.append(f"Bad files ({len(problems)}):")
        lines += [f"  {p['path']}: {_one_line(p['reason'])}" for p in problems]
    else:
        lines.append(f"Every image and mask {checked}: no bad files.")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usable(dataset, problems) -> bool:
    """True when some record touches none of the bad files."""
    bad = {p["path"] for p in problems}
    return any(
        str(r.image) not in bad and not any(str(m) in bad for m in r.masks.values() if m)
        for r in dataset.records
    )


def _progress_bar(records):
    if not sys.stderr.isatty():
        return records
    return _bar(records)


def _bar(records):
    with click.progressbar(records, label="Decoding", file=sys.stderr) as bar:
        yield from bar
