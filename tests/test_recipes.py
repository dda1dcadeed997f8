"""Every recipe in the repository loads through the one config loader."""

from pathlib import Path

import pytest

from rmib.config import load_config
from rmib.methods.classifier.config import PretrainConfig
from rmib.methods.segment_config import SegmentConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "pretrain").glob("*.toml")), ids=lambda p: p.name)
def test_pretrain_recipes_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.image_size == 480 and cfg.backbone in ("vgg16", "resnet50")


@pytest.mark.parametrize("path", sorted((ROOT / "segment").glob("*.toml")), ids=lambda p: p.name)
def test_segment_recipes_load(path):
    cfg = load_config(SegmentConfig, path)
    assert cfg.lesion in ("EX", "HE", "MA", "SE")


def test_there_is_a_recipe_per_lesion_and_encoder():
    names = {p.stem for p in (ROOT / "segment").glob("idrid_*_*.toml")}
    for lesion in ("ex", "he", "ma", "se"):
        for encoder in ("vgg16", "vgg16_cbam", "resnet50", "resnet50_cbam"):
            assert f"idrid_{lesion}_{encoder}" in names


# --------------------------------------------------------------------------- by name


def test_a_recipe_is_found_by_its_bare_name():
    from rmib.recipes import find_recipe

    expected = ROOT / "pretrain" / "vgg16_cbam.toml"
    for name in ("vgg16_cbam", "vgg16_cbam.toml", "pretrain/vgg16_cbam"):
        assert find_recipe(name) == expected
    assert find_recipe("idrid_yang2017") == ROOT / "grading" / "idrid_yang2017.toml"


def test_an_unknown_recipe_name_lists_the_close_ones():
    from rmib.errors import RmibError
    from rmib.recipes import find_recipe

    with pytest.raises(RmibError, match="no recipe named 'vgg16_cbm'") as caught:
        find_recipe("vgg16_cbm")
    assert "close names: vgg16_cbam, vgg16" in str(caught.value)
    assert "rmib recipes" in str(caught.value)
    with pytest.raises(RmibError, match="the recipes: resnet50, resnet50_cbam"):
        find_recipe("zzzz")


def test_every_recipe_is_listed_once_and_names_are_unique():
    from rmib.recipes import list_recipes

    recipes = list_recipes()
    on_disk = sorted(
        p for folder in ("pretrain", "segment", "grading") for p in (ROOT / folder).glob("*.toml")
    )
    assert sorted(r.path for r in recipes) == on_disk
    assert len({r.name for r in recipes}) == len(recipes), "two recipes share a name"
    assert all(r.summary for r in recipes), [r.name for r in recipes if not r.summary]


def test_recipe_summary_is_the_first_sentence_of_the_leading_comment(tmp_path):
    from rmib.recipes import SUMMARY_LENGTH, recipe_summary

    short = tmp_path / "short.toml"
    short.write_text("#\n# Stage 1: a classifier\n# at 480 px. More text.\n#\n# Not this.\nx = 1\n")
    assert recipe_summary(short) == "Stage 1: a classifier at 480 px"
    long = tmp_path / "long.toml"
    head = "A long title (with details)"
    long.write_text(f"# {head}: " + "word " * SUMMARY_LENGTH + "\nx = 1\n")
    assert recipe_summary(long) == head
    bare = tmp_path / "bare.toml"
    bare.write_text("x = 1  # a value\n")
    assert recipe_summary(bare) == ""


# --------------------------------------------------------------------------- in the wheel


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_wheel_carries_the_recipes_and_finds_them_installed(tmp_path):
    """A non-editable build (setup.py's build_py copies the recipes), unpacked as pip
    installs it: `rmib.recipes` finds every recipe inside the installed package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: pip builds in the source tree (build/, *.egg-info)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rmib", "pretrain", "segment", "grading"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", str(src), "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("rmib-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for folder in ("pretrain", "segment", "grading"):
        for recipe in (ROOT / folder).glob("*.toml"):
            assert f"rmib/recipes/{folder}/{recipe.name}" in names
    probe = (
        "import rmib, rmib.recipes as r; from rmib.cli import cli; "
        "print(rmib.__file__); print(r.find_recipe('vgg16_cbam')); print(len(r.list_recipes()))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    module, found, count = shown.stdout.split()
    site = str(tmp_path / "site")
    assert module.startswith(site) and found == f"{site}/rmib/recipes/pretrain/vgg16_cbam.toml"
    assert int(count) == sum(
        len(list((ROOT / f).glob("*.toml"))) for f in ("pretrain", "segment", "grading")
    )
