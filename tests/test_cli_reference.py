"""docs/CLI.md is generated from the commands' --help and kept in step with them."""

from pathlib import Path

from rmib.cli import cli, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_reference_lists_every_command():
    text = reference_markdown()
    for name in cli.list_commands(None):
        assert f"## `rmib {name}`" in text


def test_usage_lines_name_each_command_once():
    text = reference_markdown()
    assert "Usage: rmib segment [OPTIONS]" in text
    assert "Usage: rmib data synth [OPTIONS] OUT" in text
    assert "rmib rmib" not in text


def test_docs_cli_md_is_up_to_date(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    committed = (ROOT / "docs" / "CLI.md").read_text()
    # Column alignment depends on the terminal click sees; the words must not.
    assert committed.split() == reference_markdown().split(), "run `make docs`"


def test_reference_does_not_depend_on_earlier_invocations(monkeypatch):
    # click caches each command's help option on first use; in the full suite the
    # CLI has been invoked before the reference is generated (CI failed on this).
    from click.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "100")
    before = reference_markdown()
    for args in (["-h"], ["data", "inspect", "-h"], ["segment", "--help"]):
        assert CliRunner().invoke(cli, args).exit_code == 0
    assert reference_markdown() == before
    assert before.count("-h, --help") == before.count("## `rmib")
