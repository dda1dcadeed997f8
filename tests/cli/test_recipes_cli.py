"""`rmib recipes` and `--config NAME` through the real CLI group."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rmib.cli import cli
from rmib.cli.options import RECIPE_FILE

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("pretrain", "segment", "grading")


def test_rmib_recipes_lists_every_recipe_with_its_summary():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for folder in FOLDERS:
        assert f"{folder}/" in lines
    recipes = [p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.toml"))]
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == [p.stem for p in recipes]
    vgg = next(line for line in lines if line.split()[:1] == ["vgg16_cbam"])
    assert vgg.endswith(
        "Stage 1 of the RMIB paper: vgg16 + CBAM lesion / healthy classifier at 480 px"
    )
    paths = CliRunner().invoke(cli, ["recipes", "--paths"])
    assert str(ROOT / "grading" / "idrid_yang2017.toml") in paths.output


@click.command()
@click.option("--config", type=RECIPE_FILE)
def _show(config):
    click.echo(str(config))


def test_config_takes_a_file_or_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(_show, ["--config", "vgg16_cbam"]).output.strip() == str(
        ROOT / "pretrain" / "vgg16_cbam.toml"
    )
    own = tmp_path / "vgg16_cbam"  # a file of that name wins over the recipe
    own.write_text("epochs = 1\n")
    assert CliRunner().invoke(_show, ["--config", "vgg16_cbam"]).output.strip() == "vgg16_cbam"
    folder = CliRunner().invoke(_show, ["--config", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.output
    missing = CliRunner().invoke(_show, ["--config", "a/b/c.toml"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.parametrize(
    "command", [["pretrain"], ["segment", "--lesion", "EX"], ["grade", "train"]]
)
def test_an_unknown_recipe_name_is_refused_before_anything_is_written(tmp_path, command):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    args = [*command, "--data", str(data), "--out", str(out), "--config", "vgg16_cbm"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "no recipe named 'vgg16_cbm'" in result.output
    assert "close names: vgg16_cbam, vgg16" in result.output
    assert "Traceback" not in result.output and not out.exists()
