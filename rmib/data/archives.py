"""Unpack IDRiD's official download into the folder layout its reader expects.

IDRiD is downloaded (after a login) as one .zip per part: "A. Segmentation.zip",
"B. Disease Grading.zip" and "C. Localization.zip", each holding the folder of
the same name; a repacked copy may add a top folder, macOS `__MACOSX` entries,
or hold the part archives themselves. `unpack_idrid` finds the part folders
wherever they sit and writes `OUT/A. Segmentation/...` and
`OUT/B. Disease Grading/...`, the two parts rmib reads (C. Localization is
skipped), each one atomically, so an interrupted unpack leaves nothing half-made
and running it again skips the parts already unpacked.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from rmib import io
from rmib.data.readers.common import norm, visible
from rmib.data.readers.idrid import IDRID_GRADING_PART, IDRID_SEGMENTATION_PART
from rmib.errors import RmibError

READ_PARTS = (IDRID_SEGMENTATION_PART, IDRID_GRADING_PART)
"""Regexes (on `norm`-alised names) of the parts rmib reads."""
SKIPPED_PART = r"^(c\.? ?)?localization$"
DONE_MARKER = ".rmib-unpacked"
"""Written last in each unpacked part (a hidden file: readers ignore it)."""


def _part_of(name: str) -> str | None:
    key = norm(name)
    if any(re.search(pattern, key) for pattern in READ_PARTS):
        return "read"
    return "skip" if re.search(SKIPPED_PART, key) else None


def _members(archive: Path, names: list[str]):
    """(part folder name, path inside it, member name) of each file of a part folder;
    nested part archives ("A. Segmentation.zip") as (None, None, member name)."""
    found = []
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            raise RmibError(f"{archive}: unsafe member name {name!r}; expected relative paths")
        if name.endswith("/") or not all(visible(p) for p in path.parts):
            continue
        index = next((i for i, p in enumerate(path.parts) if _part_of(p)), None)
        if index is None:
            if path.suffix.lower() == ".zip" and _part_of(path.stem) == "read":
                found.append((None, None, name))
            continue
        inside = PurePosixPath(*path.parts[index + 1 :])
        if not inside.parts:
            continue  # a file named like a part, not a folder
        found.append((path.parts[index], inside, name))
    return found


def unpack_idrid(archives, out, echo=print) -> dict:
    """Unpack IDRiD's official .zip files into `out` (the folder to give `--data`).

    Args:
        archives: the .zip files downloaded from IDRiD's page (one per part, or
            one archive holding the part folders or the part archives).
        out: the dataset folder to write; its parts go to `out/<part folder>`.
        echo: where progress lines go.

    Returns:
        {part folder name: number of files written, or 0 when already unpacked}.

    Raises:
        RmibError: an archive is missing, not a zip, holds no IDRiD part, has an
            unsafe member name, or a part folder already exists without having
            been unpacked here (rmib never writes into a folder of yours).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RmibError(f"{out}: is a file; expected the folder to unpack IDRiD into")
    archives = [Path(archive) for archive in archives]
    if not archives:
        raise RmibError("no archive given; expected the .zip files downloaded from IDRiD's page")
    for archive in archives:
        _check_archive(archive)
    out.mkdir(parents=True, exist_ok=True)
    written: dict = {}
    for archive in archives:
        _unpack_archive(archive, out, written, echo)
    return written


def _check_archive(archive: Path) -> None:
    if not archive.is_file():
        raise RmibError(f"{archive}: archive not found; expected IDRiD's downloaded .zip")
    if not zipfile.is_zipfile(archive):
        raise RmibError(f"{archive}: not a .zip file; expected IDRiD's downloaded .zip")


def _unpack_archive(archive: Path, out: Path, written: dict, echo) -> None:
    _check_archive(archive)
    with zipfile.ZipFile(archive) as zipped:
        members = _members(archive, zipped.namelist())
        parts = sorted({part for part, _, _ in members if part is not None})
        nested = [name for part, _, name in members if part is None]
        if not parts and not nested:
            raise RmibError(
                f"{archive}: holds no 'A. Segmentation' or 'B. Disease Grading' folder; "
                "expected an archive downloaded from IDRiD's page"
            )
        for part in parts:
            if _part_of(part) == "skip":
                echo(f"{archive.name}: {part} skipped (rmib does not read it)")
                continue
            files = [(inside, name) for p, inside, name in members if p == part]
            written[part] = _unpack_part(zipped, archive, part, files, out, echo)
        for name in nested:
            with tempfile.TemporaryDirectory(prefix=".unpack.", dir=out) as tmp:
                inner = Path(tmp) / PurePosixPath(name).name
                with zipped.open(name) as source, open(inner, "wb") as target:
                    shutil.copyfileobj(source, target)
                _unpack_archive(inner, out, written, echo)


def _unpack_part(zipped, archive: Path, part: str, files: list, out: Path, echo) -> int:
    target = out / part
    if (target / DONE_MARKER).is_file():
        echo(f"{target}: already unpacked, left as it is")
        return 0
    if target.exists():
        raise RmibError(
            f"{target}: already exists and was not unpacked by rmib; remove it or "
            "choose another output folder"
        )
    with io.atomic_directory(target) as tmp:
        for inside, name in files:
            destination = tmp.joinpath(*inside.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zipped.open(name) as source, open(destination, "wb") as copy:
                    shutil.copyfileobj(source, copy, length=1 << 20)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                if isinstance(exc, OSError) and exc.filename:
                    raise
                raise RmibError(f"{archive}: member {name!r} is corrupt: {exc}") from None
        (tmp / DONE_MARKER).write_text(f"{archive.name}\n", encoding="utf-8")
    echo(f"{target}: {len(files)} files from {archive.name}")
    return len(files)
