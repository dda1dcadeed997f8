"""The names of the temporary files of rmib's atomic writes, and their removal after a crash."""

from rmib import io


def test_real_temporary_names_are_recognised(tmp_path):
    names = []
    with io.atomic_path(tmp_path / "last.keras") as tmp:
        names.append(tmp.name)
    with io.atomic_path(tmp_path / "no_suffix") as tmp:
        names.append(tmp.name)
    with io.atomic_write(tmp_path / "history.csv") as f:
        f.write("epoch\n")
        names += [p.name for p in tmp_path.iterdir() if p.name.startswith(".history")]
    with io.atomic_directory(tmp_path / "export") as folder:
        names.append(folder.name)
    assert len(names) == 4
    assert all(io.is_atomic_temporary(name) for name in names), names


def test_other_names_are_not_temporaries():
    for name in (
        "last.keras",
        "config.toml",
        ".gitignore",
        ".notes.txt",
        ".export.old",  # atomic_directory's previous version: never deleted
        "history.abcd1234.tmp",  # not hidden
        ".nfs000000000012ab0000000c",
        ".last.abc.keras",
    ):
        assert not io.is_atomic_temporary(name), name
    assert io.is_atomic_temporary(".last.k3x9a0q2.keras")
    assert io.is_atomic_temporary(".config.toml.k3_9a0q2.tmp")


def test_remove_atomic_temporaries_skips_folders_and_other_files(tmp_path):
    stale = [
        tmp_path / ".rmib.json.abcdefgh.tmp",
        tmp_path / "checkpoints" / ".best.12345678.keras",
    ]
    kept = [
        tmp_path / "rmib.json",
        tmp_path / ".hidden",
        tmp_path / "workers" / "worker_1" / ".last.abcdefgh.keras",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / ".export.abcdefgh").mkdir()  # a folder: left alone
    removed = io.remove_atomic_temporaries(tmp_path, skip=[tmp_path / "workers"])
    assert removed == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.is_file() for p in kept) and (tmp_path / ".export.abcdefgh").is_dir()
