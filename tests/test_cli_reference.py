"""docs/CLI.md is generated from the commands' --help and kept in step with them."""

from pathlib import Path

from rmib.cli import cli, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_reference_lists_every_command():
    text = reference_markdown()
    for name in cli.list_commands(None):
        assert f"## `rmib {name}`" in text


def test_docs_cli_md_is_up_to_date(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    committed = (ROOT / "docs" / "CLI.md").read_text()
    # Column alignment depends on the terminal click sees; the words must not.
    assert committed.split() == reference_markdown().split(), "run `make docs`"
