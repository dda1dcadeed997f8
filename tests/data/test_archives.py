"""rmib.data.archives.unpack_idrid and `rmib data unpack-idrid` on small synthetic archives
packed with the official download's folder names."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from rmib.cli import cli
from rmib.data import readers, synthetic
from rmib.data.archives import DONE_MARKER, unpack_idrid
from rmib.errors import RmibError

PARTS = ("A. Segmentation", "B. Disease Grading")


@pytest.fixture(scope="module")
def idrid_tree(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("idrid"), "idrid", 4, 64, seed=3)


def zip_part(tree: Path, part: str, archive: Path, prefix="", extra=()) -> Path:
    """The part folder as IDRiD ships it: "<part>.zip" holding "<part>/..." (plus junk)."""
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{prefix}{part}/", "")
        for path in sorted((tree / part).rglob("*")):
            if path.is_file():
                zipped.write(path, f"{prefix}{path.relative_to(tree)}")
        zipped.writestr(f"__MACOSX/{prefix}{part}/._IDRiD_01.jpg", b"mac resource fork")
        for name, data in extra:
            zipped.writestr(name, data)
    return archive


def tree_files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_the_official_part_archives_unpack_into_the_readers_layout(idrid_tree, tmp_path):
    a = zip_part(idrid_tree, PARTS[0], tmp_path / "A. Segmentation.zip")
    b = zip_part(
        idrid_tree, PARTS[1], tmp_path / "B. Disease Grading.zip",
        extra=[("C. Localization/1. Original Images/x.jpg", b"not read")],
    )  # fmt: skip
    out = tmp_path / "IDRiD"
    lines = []
    written = unpack_idrid([a, b], out, echo=lines.append)
    expected = tree_files(idrid_tree)
    assert tree_files(out) == expected  # byte for byte, no __MACOSX, no C. Localization
    assert written == {
        part: sum(1 for name in expected if name.startswith(part + os.sep)) for part in PARTS
    }
    assert any("C. Localization skipped" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == list(PARTS)  # no temporary left
    unpacked = readers.read_dataset(out)
    original = readers.read_dataset(idrid_tree)
    assert unpacked.layout == original.layout == "idrid"
    assert [(r.name, r.split, r.grade) for r in unpacked.records] == [
        (r.name, r.split, r.grade) for r in original.records
    ]
    # Run again (a Colab notebook re-run after a disconnect): nothing rewritten.
    assert unpack_idrid([a, b], out, echo=lines.append) == {PARTS[0]: 0, PARTS[1]: 0}
    assert (out / PARTS[0] / DONE_MARKER).read_text().strip() == "A. Segmentation.zip"


def test_a_repacked_archive_with_a_top_folder_and_nested_part_zips(idrid_tree, tmp_path):
    inner = zip_part(idrid_tree, PARTS[0], tmp_path / "A. Segmentation.zip")
    outer = tmp_path / "IDRiD.zip"
    with zipfile.ZipFile(outer, "w") as zipped:
        zipped.write(inner, "IDRiD/A. Segmentation.zip")
        for path in sorted((idrid_tree / PARTS[1]).rglob("*")):
            if path.is_file():
                zipped.write(path, f"IDRiD/{path.relative_to(idrid_tree)}")
    out = tmp_path / "out"
    written = unpack_idrid([outer], out, echo=lambda line: None)
    assert set(written) == set(PARTS)
    assert tree_files(out) == tree_files(idrid_tree)
    assert sorted(p.name for p in out.iterdir()) == list(PARTS)


def test_bad_archives_are_refused_with_their_name_and_nothing_written(idrid_tree, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "A. Segmentation.zip"
    text.write_text("not a zip")
    with pytest.raises(RmibError, match=r"A\. Segmentation\.zip: not a \.zip file"):
        unpack_idrid([text], out)
    with pytest.raises(RmibError, match="archive not found"):
        unpack_idrid([tmp_path / "missing.zip"], out)
    assert not out.exists()
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zipped:
        zipped.writestr("photos/a.jpg", b"x")
    with pytest.raises(RmibError, match="holds no 'A. Segmentation' or 'B. Disease Grading'"):
        unpack_idrid([other], out)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("A. Segmentation/../../escaped.txt", b"x")
    with pytest.raises(RmibError, match="unsafe member name"):
        unpack_idrid([evil], out)
    assert not (tmp_path / "escaped.txt").exists() and not (out / PARTS[0]).exists()


def test_a_folder_of_the_users_is_never_written_into(idrid_tree, tmp_path):
    archive = zip_part(idrid_tree, PARTS[0], tmp_path / "A. Segmentation.zip")
    out = tmp_path / "out"
    (out / PARTS[0]).mkdir(parents=True)
    (out / PARTS[0] / "mine.txt").write_text("keep")
    with pytest.raises(RmibError, match="already exists and was not unpacked by rmib"):
        unpack_idrid([archive], out)
    assert tree_files(out) == {f"{PARTS[0]}/mine.txt": b"keep"}


def test_rmib_data_unpack_idrid(idrid_tree, tmp_path):
    archive = zip_part(idrid_tree, PARTS[1], tmp_path / "B. Disease Grading.zip")
    out = tmp_path / "IDRiD"
    result = CliRunner().invoke(cli, ["data", "unpack-idrid", str(archive), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"read it with --data {out}" in result.output
    assert tree_files(out) == {
        k: v for k, v in tree_files(idrid_tree).items() if k.startswith(PARTS[1])
    }
    bad = CliRunner().invoke(cli, ["data", "unpack-idrid", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and "is a directory" in bad.output
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK no")
    refused = CliRunner().invoke(cli, ["data", "unpack-idrid", str(junk), "--out", str(out)])
    assert refused.exit_code == 1 and "junk.zip: not a .zip file" in refused.output
    assert "Traceback" not in refused.output
