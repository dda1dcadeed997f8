"""The TOML recipes, found by name: `find_recipe("vgg16_cbam")`, `list_recipes()`.

The repository's top-level `pretrain/`, `segment/` and `grading/` folders are the
recipes' source. A wheel carries copies of them in this package (`setup.py`
copies them at build time), so an installed rmib finds them here; a source
checkout (an editable install, or `PYTHONPATH`) finds them beside `rmib/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from rmib.errors import RmibError

FOLDERS = ("pretrain", "segment", "grading")
"""The recipe folders, in the order the commands use them (stage 1, stage 2, grading)."""

_HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe file: its name (the file stem), folder, path and one-line summary."""

    name: str
    folder: str
    path: Path

    @property
    def summary(self) -> str:
        return recipe_summary(self.path)


def recipe_folders() -> list[Path]:
    """The recipe folders this rmib reads: the wheel's copies, else the checkout's."""
    installed = [_HERE / name for name in FOLDERS if (_HERE / name).is_dir()]
    if installed:
        return installed
    checkout = _HERE.parent.parent
    return [checkout / name for name in FOLDERS if (checkout / name).is_dir()]


def list_recipes() -> list[Recipe]:
    """Every recipe, folder by folder (FOLDERS order), sorted by name within a folder."""
    return [
        Recipe(path.stem, folder.name, path)
        for folder in recipe_folders()
        for path in sorted(folder.glob("*.toml"))
    ]


def find_recipe(name: str) -> Path:
    """The recipe file called `name` ("vgg16_cbam" or "pretrain/vgg16_cbam", ".toml" optional).

    Raises:
        RmibError: no recipe has that name; the message lists the close names
            (or every name when none is close) and says how to list them all.
    """
    wanted = name.strip().removesuffix(".toml")
    recipes = list_recipes()
    if not recipes:
        raise RmibError(
            f"no recipe named {name!r}: this rmib has no recipe folders (looked in "
            f"{_HERE} and beside the rmib package); give the path of a TOML file"
        )
    for recipe in recipes:
        if wanted in (recipe.name, f"{recipe.folder}/{recipe.name}"):
            return recipe.path
    names = [recipe.name for recipe in recipes]
    close = difflib.get_close_matches(wanted.split("/")[-1], names, n=6, cutoff=0.5)
    close += [n for n in names if wanted and wanted in n and n not in close]
    what, listed = ("close names", close[:8]) if close else ("the recipes", names)
    raise RmibError(
        f"no recipe named {name!r} and no such file; {what}: {', '.join(listed)} "
        "(`rmib recipes` lists them all)"
    )


_SENTENCE_END = re.compile(r"(?<=\.)\s")
_CLAUSE_END = re.compile(r"(?<=:)\s")
SUMMARY_LENGTH = 120


def recipe_summary(path) -> str:
    """The first sentence of a recipe's leading comment block ("" when it has none),
    cut at its first colon when it is longer than SUMMARY_LENGTH characters."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    sentence = _SENTENCE_END.split(" ".join(lines), maxsplit=1)[0]
    if len(sentence) > SUMMARY_LENGTH:
        sentence = _CLAUSE_END.split(sentence, maxsplit=1)[0]
    return sentence.rstrip(".:;")
