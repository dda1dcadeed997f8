"""Atomic writes keep the usual file mode (mkstemp alone would make files private)."""

import os
import stat

from rmib import io


def test_atomic_writes_are_readable_by_others(tmp_path):
    mask = os.umask(0o022)
    try:
        with io.atomic_write(tmp_path / "a.txt") as f:
            f.write("x")
        with io.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        with io.atomic_directory(tmp_path / "c") as folder:
            (folder / "d.txt").write_text("z")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
    assert (tmp_path / "a.txt").read_text() == "x"
