"""benchmarks/idrid_real.py: the split, stage-1 exclusion, skip logic and renderer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

from benchmarks import idrid_real, run


def test_split_is_the_eleven_fixed_photographs():
    names = [f"IDRiD_{n:02d}" for n in range(1, 55)]
    train, val = idrid_real.split_names(names)
    assert val == [f"IDRiD_{n:02d}" for n in (3, 8, 13, 18, 23, 28, 33, 38, 43, 48, 53)]
    assert len(train) == 43 and not set(train) & set(val)
    assert idrid_real.split_names([f"IDRiD_{n:02d}" for n in range(1, 11)])[1] == [
        "IDRiD_03",
        "IDRiD_08",
    ]


def _fake_idrid(root):
    (root / idrid_real.GRADING_CSV).parent.mkdir(parents=True)
    (root / idrid_real.GRADING_IMAGES).mkdir(parents=True)
    (root / "duplicates.csv").write_text(
        "segmentation_photograph,grading_photograph,similarity\n"
        "IDRiD_03,IDRiD_369,1.0\nIDRiD_04,IDRiD_100,1.0\n"
    )
    grades = {"IDRiD_001": 0, "IDRiD_002": 3, "IDRiD_369": 2, "IDRiD_100": 0}
    (root / idrid_real.GRADING_CSV).write_text(
        "Image name,Retinopathy grade,Risk of macular edema \n"
        + "".join(f"{name},{grade},0\n" for name, grade in grades.items())
    )
    for name in grades:
        (root / idrid_real.GRADING_IMAGES / f"{name}.jpg").write_bytes(b"jpg")


def test_stage1_view_leaves_out_the_copies_of_validation_photographs(tmp_path):
    _fake_idrid(tmp_path / "idrid")
    view = idrid_real.build_stage1_view(tmp_path / "idrid", tmp_path / "view")
    assert view == {"healthy": 2, "lesion": 1, "excluded": ["IDRiD_369"]}
    assert sorted(p.name for p in (tmp_path / "view" / "lesion").iterdir()) == ["IDRiD_002.jpg"]
    healthy = sorted(p.name for p in (tmp_path / "view" / "healthy").iterdir())
    assert healthy == ["IDRiD_001.jpg", "IDRiD_100.jpg"]
    # Built twice (a re-run): the same view.
    assert idrid_real.build_stage1_view(tmp_path / "idrid", tmp_path / "view")["lesion"] == 1


def test_stage1_exclusion_on_the_real_duplicates(shared_data):
    excluded = idrid_real.stage1_exclusions(shared_data / "idrid" / "duplicates.csv")
    assert "IDRiD_369" in excluded  # the graded copy of IDRiD_03
    assert 0 < len(excluded) <= 11


def test_finished_rows_are_skipped_and_unknown_rows_refused(tmp_path):
    path = tmp_path / "results.json"
    results = idrid_real.load_results(path)
    assert idrid_real.pending_rows(results, ["EX_e", "stage1"]) == ["stage1", "EX_e"]
    results["rows"]["stage1"] = {"roc_auc": 0.8}
    results["rows"]["EX_e"] = {"command": "a failed row has no scores"}
    idrid_real.save_results(path, results)
    assert idrid_real.pending_rows(idrid_real.load_results(path), ["EX_e", "stage1"]) == ["EX_e"]
    with pytest.raises(SystemExit, match="EX_z"):
        idrid_real.pending_rows(results, ["EX_z"])


def test_screening_and_quick_rows_stay_out_of_the_committed_json(tmp_path):
    assert idrid_real.results_path(False, 30.0, tmp_path) == idrid_real.RESULTS
    assert idrid_real.results_path(False, 10.0, tmp_path).parent == tmp_path
    assert idrid_real.results_path(True, 1.0, tmp_path).parent == tmp_path


def test_renderer_shows_measured_rows_and_never_invents_the_others():
    row = {
        "kind": idrid_real.KIND_NAMES["e"],
        "ap": 0.6681,
        "f1": 0.5,
        "threshold": 0.5,
        "region_f": 0.25,
        "seconds_per_photograph": 3.42,
        "cpu": "AMD EPYC",
        "pinned": "taskset -c 1",
        "command": "python -m benchmarks.idrid_real unet --lesion EX",
    }
    text = idrid_real.render_idrid_real({"rows": {"EX_e": row}}, {}, run.Settings())
    line = next(x for x in text.splitlines() if x.startswith("| EX_e "))
    assert "| 0.668 | 0.500 (0.5) | 0.250 | 3.4 | AMD EPYC, taskset -c 1 |" in line
    assert text.count("not measured yet") == len(idrid_real.ROWS) - 1
    assert "`python -m benchmarks.idrid_real unet --lesion EX`" in text


def test_row_commands_are_one_command_line_each(tmp_path):
    ctx = idrid_real._context(False, 30.0, tmp_path, None)
    ctx["val_names"] = list(idrid_real.VAL_NAMES)
    for key in idrid_real.ROWS:
        command = idrid_real.row_command(key, ctx)
        assert all(isinstance(a, str) for a in command)
        assert "--time-limit" in command and command[command.index("--time-limit") + 1] == "30.0"
        assert command[command.index("--precision") + 1] == "float32"
        if key != "stage1":
            assert command.count("--val-names") == 11
    transferred = idrid_real.row_command("EX_a_seed1", ctx)
    assert transferred[transferred.index("--encoder") + 1] == str(tmp_path / "stage1")
    assert transferred[transferred.index("--seed") + 1] == "1"
    unet = idrid_real.row_command("MA_e", ctx)
    assert (
        unet[unet.index("--scale") + 1] == "0.5" and unet[unet.index("--patch-size") + 1] == "256"
    )


def test_sections_not_re_measured_are_kept(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.write_markdown(out, {"peak": "old peak", "idrid_real": "real rows", "tile_aupr": "t"})
    run.merge_sections(out, {"peak": "new peak", "tiled_prediction": "tiles"})
    sections = run.read_sections(out)
    assert sections == {
        "peak": "new peak",
        "tiled_prediction": "tiles",
        "idrid_real": "real rows",
        "tile_aupr": "t",
    }
    assert "idrid_real" in run.BENCHMARKS and "idrid_real" not in run.DEFAULT_BENCHMARKS


@pytest.mark.slow
def test_quick_mode_runs_end_to_end(shared_data, tmp_path):
    env = {**os.environ, "RMIB_BENCH_WORKDIR": str(tmp_path / "work")}
    out = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, "-m", "benchmarks.run", "--only", "idrid_real", "--quick"]
    done = subprocess.run(
        [*command, "--out", out], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "work" / "idrid_real_quick.json").read_text())
    assert set(results["rows"]) == set(idrid_real.QUICK_ROWS)
    for key in ("EX_a_seed0", "EX_e"):
        assert 0.0 <= results["rows"][key]["ap"] <= 1.0
    assert 0.0 <= results["rows"]["stage1"]["roc_auc"] <= 1.0
    section = run.read_sections(out)["idrid_real"]
    assert "| EX_e | EX |" in section and "not measured yet" in section


def test_committed_rows_render_into_benchmarks_md(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.write_markdown(out, {"tile_aupr": "kept"})
    idrid_real.render_committed(out)
    sections = run.read_sections(out)
    committed = idrid_real.load_results(idrid_real.RESULTS)["rows"]
    assert sections["tile_aupr"] == "kept"
    missing = len(idrid_real.ROWS) - len(committed)
    assert sections["idrid_real"].count("not measured yet") == missing
