"""Table 1 of Yan et al. (AUPR per lesion per method) from `rmib evaluate` metrics.json files."""

import json
import subprocess
import sys

import pytest

from rmib.errors import RmibError
from rmib.methods.local_global.table import (
    PAPER_TABLE1,
    ablation_table,
    collect_results,
    format_table,
    main,
)

pytestmark = pytest.mark.timeout(60)


def write_metrics(root, method, lesion, aupr, sub=None):
    folder = root / method / (sub or lesion)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"lesion": lesion, "images": 27, "aupr": aupr, "f1": 0.5}
    (folder / "metrics.json").write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "eval"
    write_metrics(root, "global", "EX", 0.8491)
    write_metrics(root, "global", "MA", 0.4)
    write_metrics(root, "local", "EX", 0.845)
    write_metrics(root, "local", "MA", 0.433)
    write_metrics(root, "fused", "EX", 0.8889)
    write_metrics(root, "fused", "MA", 0.5254)
    write_metrics(root, "fused", "HE", 0.703, sub="nested/HE")
    write_metrics(root, "dual2net", "EX", 0.9)
    return root


def test_collects_one_value_per_method_and_lesion(results):
    got = collect_results(results)
    assert got == {
        "GlobalNet": {"EX": 0.8491, "MA": 0.4},
        "LocalNet": {"EX": 0.845, "MA": 0.433},
        "Fused local-global": {"EX": 0.8889, "MA": 0.5254, "HE": 0.703},
        "dual2net": {"EX": 0.9},
    }


def test_markdown_layout_of_table_1(results):
    lines = ablation_table(results).splitlines()
    assert lines[0] == "| Method / AUPR | EX | MA | HE |"
    assert lines[1] == "| --- | --- | --- | --- |"
    # Paper order first (GlobalNet, LocalNet, fused), then other methods; best in bold.
    assert lines[2] == "| GlobalNet | 0.849 | 0.400 | - |"
    assert lines[3] == "| LocalNet | 0.845 | 0.433 | - |"
    assert lines[4] == "| Fused local-global | 0.889 | **0.525** | **0.703** |"
    assert lines[5] == "| dual2net | **0.900** | - | - |"
    assert len(lines) == 6


def test_csv_and_paper_rows(results):
    text = ablation_table(results, fmt="csv", paper=True)
    lines = text.splitlines()
    assert lines[0] == "method,EX,MA,HE,SE"
    assert lines[1] == "GlobalNet,0.849,0.400,,"
    assert lines[-1] == "Fused model (paper),0.889,0.525,0.703,0.679"
    assert len(lines) == 1 + 4 + len(PAPER_TABLE1)


def test_ties_are_all_bold_and_unknown_format_fails():
    table = format_table({"a": {"EX": 0.5}, "b": {"EX": 0.5}, "c": {"EX": 0.1}})
    assert table.count("**0.500**") == 2 and "**0.100**" not in table
    with pytest.raises(ValueError, match="format"):
        format_table({}, fmt="html")


def test_bad_inputs_name_the_file(tmp_path, results):
    with pytest.raises(RmibError, match="no <method>"):
        collect_results(tmp_path / "eval" / "global" / "EX")
    with pytest.raises(RmibError, match="not a folder"):
        collect_results(tmp_path / "missing")
    write_metrics(results, "global", "EX", 0.1, sub="again")
    with pytest.raises(RmibError, match="second EX result for global"):
        collect_results(results)
    broken = tmp_path / "broken"
    (broken / "local" / "EX").mkdir(parents=True)
    (broken / "local" / "EX" / "metrics.json").write_text("{not json")
    with pytest.raises(RmibError, match="metrics.json"):
        collect_results(broken)


def test_main_writes_the_table_and_reports_errors(results, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main([str(results), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
    assert "| Fused local-global |" in out.read_text()
    assert main([str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_python_dash_m_entry_point(results):
    done = subprocess.run(
        [sys.executable, "-m", "rmib.methods.local_global.table", str(results), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "method,EX,MA,HE"
