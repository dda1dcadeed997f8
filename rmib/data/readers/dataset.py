"""`read_dataset` and `detect_layout`: the table of layout families and how a folder
is matched to one."""

from __future__ import annotations

from pathlib import Path

from rmib.choices import DATASET_LAYOUTS
from rmib.data.readers import ddr, eophtha, folder, idrid, kaggle, messidor
from rmib.data.readers.common import Family, Problems, check_on_bad, check_root, describe, entries
from rmib.data.records import Dataset
from rmib.errors import RmibError


def read_dataset(root, layout=None, on_bad="error", allow_empty=False) -> Dataset:
    """Read the records of a dataset tree.

    Args:
        root: the dataset folder.
        layout: one of `LAYOUTS` ("idrid", "kaggle", ... or a part such as
            "idrid-grading"); detected with `detect_layout` when None.
        on_bad: "error" raises at the first bad entry; "skip" leaves it out and
            appends (path, reason) to `Dataset.problems`.
        allow_empty: return a dataset without records instead of raising.

    Returns:
        The Dataset; its `layout` is the part read ("idrid-segmentation"), or
        the family name when the tree holds several parts of it ("idrid").

    Raises:
        BadInputError: with on_bad="error", naming the first bad file and what
            was expected (a label naming a missing image, an image without a
            label, a bad grade, a table without the expected columns, ...).
        RmibError: not a folder, unknown or undetectable layout, no images.
    """
    check_on_bad(on_bad)
    root = check_root(root)
    layout = detect_layout(root) if layout is None else str(layout).strip().lower()
    family, parts = _resolve_layout(root, layout)
    bad = Problems(on_bad)
    records, lesions = family.read(root, parts, bad)
    name = parts[0] if len(parts) == 1 else family.name
    dataset = Dataset(
        layout=name, root=root, records=records, lesions=tuple(lesions), problems=bad.items
    )
    if not records and not allow_empty:
        detail = ""
        if bad.items:
            path, reason = bad.items[0]
            detail = f"; {len(bad.items)} entries skipped, the first: {path}: {reason}"
        raise RmibError(f"{root}: no usable images found for the {name} layout{detail}")
    return dataset


def detect_layout(root) -> str:
    """The layout name of the dataset tree at `root` (see `LAYOUTS`).

    Raises:
        RmibError: naming the folder, what it holds and the known layouts, when
            no layout matches or several do.
    """
    root = check_root(root)
    listing = entries(root)
    if not listing:
        raise RmibError(f"{root}: the folder is empty; expected a dataset. {_known_layouts()}")
    matches = _matching_families(root)
    if len(matches) > 1:
        names = ", ".join(_layout_name(f, p) for f, p in matches)
        raise RmibError(
            f"{root}: the folder matches several layouts ({names}); choose one with --layout"
        )
    if matches:
        return _layout_name(*matches[0])
    hint = ""
    for child in [p for p in listing if p.is_dir()][:50]:
        if _matching_families(child, deep=False):
            hint = f" Did you mean {child}?"
            break
    raise RmibError(
        f"{root}: no known dataset layout found (the folder holds {describe(listing)}). "
        f"{_known_layouts()}{hint}"
    )


def _layout_name(family: Family, parts: list) -> str:
    return parts[0] if len(parts) == 1 else family.name


def _matching_families(root: Path, deep=True) -> list:
    """[(family, parts)] for every layout `root` holds. Messidor, the only layout
    found by walking the tree, is looked for when no other matches."""
    found = [(f, f.find_parts(root)) for f in _FAMILIES.values() if f.name != "messidor"]
    found = [(f, parts) for f, parts in found if parts]
    if not found:
        parts = messidor.find_parts(root, max_depth=messidor.MAX_DEPTH if deep else 0)
        if parts:
            found = [(_FAMILIES["messidor"], parts)]
    return found


def _resolve_layout(root: Path, layout: str):
    for family in _FAMILIES.values():
        if layout == family.name:
            wanted = family.find_parts(root)
        elif layout in _PARTS.get(family.name, ()):
            wanted = [layout] if layout in family.find_parts(root) else []
        else:
            continue
        if not wanted:
            raise RmibError(
                f"{root}: not in the {layout} layout; expected {_PART_DESCRIPTIONS[layout]} "
                f"(the folder holds {describe(entries(root)) or 'nothing'})"
            )
        return family, wanted
    raise RmibError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _known_layouts() -> str:
    return "Known layouts: " + "; ".join(
        f"{name} ({_PART_DESCRIPTIONS[name]})" for name in _ALL_PARTS
    )


# --- the families ------------------------------------------------------------

_FAMILIES = {
    f.name: f
    for f in (
        Family(
            "messidor",
            messidor.find_parts,
            messidor.read,
        ),
        Family(
            "kaggle",
            kaggle.csv_layout_parts("trainLabels.csv", "train", "kaggle"),
            kaggle.csv_layout_reader("trainLabels.csv", "train", "image", "level"),
        ),
        Family(
            "aptos",
            kaggle.csv_layout_parts("train.csv", "train_images", "aptos"),
            kaggle.csv_layout_reader("train.csv", "train_images", "id_code", "diagnosis"),
        ),
        Family("idrid", idrid.find_parts, idrid.read),
        Family("e-ophtha", eophtha.find_parts, eophtha.read),
        Family("ddr", ddr.find_parts, ddr.read),
        Family(
            "folder",
            folder.find_parts,
            folder.read,
        ),
    )
}

_PARTS = {
    "idrid": ("idrid-segmentation", "idrid-grading"),
    "ddr": ("ddr-segmentation", "ddr-grading"),
    "folder": ("folder-classes", "folder-masks"),
}

_PART_DESCRIPTIONS = {
    "messidor": "Annotation_Base*.xls|.xlsx|.csv beside its .tif images",
    "kaggle": "trainLabels.csv + train/",
    "aptos": "train.csv + train_images/",
    "idrid": "A. Segmentation/ and/or B. Disease Grading/",
    "idrid-segmentation": "A. Segmentation/1. Original Images/ + 2. All Segmentation Groundtruths/",
    "idrid-grading": "B. Disease Grading/1. Original Images/ + 2. Groundtruths/*.csv",
    "e-ophtha": "e_optha_EX/ and/or e_optha_MA/",
    "ddr": "lesion_segmentation/ and/or DR_grading/",
    "ddr-segmentation": "lesion_segmentation/<split>/image/ + label/<LESION>/",
    "ddr-grading": "DR_grading/<split>/ + DR_grading/<split>.txt",
    "folder": "healthy/ + lesion/, or images/ + masks/<LESION>/",
    "folder-classes": "healthy/ + lesion/",
    "folder-masks": "images/ + masks/<LESION>/",
}

_ALL_PARTS = (
    "messidor",
    "kaggle",
    "aptos",
    "idrid-segmentation",
    "idrid-grading",
    "e-ophtha",
    "ddr-segmentation",
    "ddr-grading",
    "folder-classes",
    "folder-masks",
)

LAYOUTS = DATASET_LAYOUTS
"""Every name `read_dataset(layout=...)` accepts: families and their parts."""
assert set(LAYOUTS) == set(_FAMILIES) | set(_ALL_PARTS), "choices.DATASET_LAYOUTS is the table's"
