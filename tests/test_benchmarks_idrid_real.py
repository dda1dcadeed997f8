"""benchmarks/idrid_real/: the split, stage-1 exclusion, skip logic and renderer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import idrid_real, run
from benchmarks.idrid_real import cli, runner
from tests.conftest import PROJECT_ROOT


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
    ctx = runner._context(False, 30.0, tmp_path, None)
    ctx["val_names"] = list(idrid_real.VAL_NAMES)
    for key in idrid_real.ROWS:
        command = idrid_real.row_command(key, ctx)
        assert all(isinstance(a, str) for a in command)
        assert "--time-limit" in command and command[command.index("--time-limit") + 1] == "30.0"
        assert command[command.index("--precision") + 1] == "float32"
        if not key.startswith("stage1"):
            assert command.count("--val-names") == 11
    transferred = idrid_real.row_command("EX_a_seed1", ctx)
    assert transferred[transferred.index("--encoder") + 1] == str(tmp_path / "stage1")
    assert transferred[transferred.index("--seed") + 1] == "1"
    unet = idrid_real.row_command("MA_e", ctx)
    assert (
        unet[unet.index("--scale") + 1] == "0.5" and unet[unet.index("--patch-size") + 1] == "256"
    )
    woo, stage1 = idrid_real.row_command("stage1_woo", ctx), idrid_real.row_command("stage1", ctx)
    assert woo[woo.index("--cbam-init") + 1] == "woo" and "--cbam-init" not in stage1
    assert woo[woo.index("--out") + 1] == str(tmp_path / "stage1_woo")
    assert [a for a in woo if a not in ("--cbam-init", "woo")][:-1] == stage1[:-1]
    balanced = idrid_real.row_command("stage1_bal", ctx)  # the class-balance lever
    assert "--class-weights" in balanced and "--class-weights" not in stage1
    assert [a for a in balanced if a != "--class-weights"][:-1] == stage1[:-1]
    dual2net = idrid_real.row_command("EX_d", ctx)  # offline: no ImageNet; 30 GB at full size
    assert dual2net[dual2net.index("--weights") + 1] == "none"
    at = dual2net.index("--image-size")
    assert dual2net[at + 1 : at + 3] == ["320", "480"]
    scratch = idrid_real.row_command("SE_b", ctx)
    assert scratch[scratch.index("--encoder") + 1] == "vgg16" and "--cbam" in scratch


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
@pytest.mark.timeout(900)  # three 1-minute rows, each evaluated on full-size photographs
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
    # A quick (or screening) section lists the rows it measured; only the 30-minute
    # section lists every row, "not measured yet" where it has none.
    assert "| EX_e | EX |" in section and "| EX_a_seed0 | EX |" in section
    assert "not measured yet" not in section and "1-minute quick rows" in section


def test_committed_rows_render_into_benchmarks_md(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.write_markdown(out, {"tile_aupr": "kept"})
    cli.render_committed(out)
    sections = run.read_sections(out)
    committed = idrid_real.load_results(idrid_real.RESULTS)["rows"]
    assert sections["tile_aupr"] == "kept"
    missing = len(set(idrid_real.ROWS) - set(committed))  # lever rows are extra
    assert sections["idrid_real"].count("not measured yet") == missing


def test_a_lever_is_its_recipe_with_the_overrides_and_a_row_of_its_own(tmp_path):
    import tomllib

    ctx = runner._context(False, 10.0, tmp_path, None)
    ctx["val_names"] = list(idrid_real.VAL_NAMES)
    ctx["lever"] = "lr3e-4"
    command = idrid_real.row_command("EX_a_seed0", ctx)
    assert command[command.index("--out") + 1] == str(tmp_path / "EX_a_seed0+lr3e-4")
    recipe = Path(command[command.index("--config") + 1])
    assert recipe.parent == tmp_path / "recipes"
    derived = tomllib.loads(recipe.read_text())
    base = tomllib.loads((PROJECT_ROOT / "segment" / "idrid_ex_vgg16_cbam.toml").read_text())
    assert derived["train"]["learning_rate"] == 3e-4 and derived["scale"] == 0.5
    # Every other value of the recipe is kept, the [train] table included.
    assert derived["train"]["batch_size"] == base["train"]["batch_size"]
    changed = set(idrid_real.LEVERS["lr3e-4"][1])
    assert changed >= {"train", "scale"}
    assert {k: v for k, v in derived.items() if k not in changed} == {
        k: v for k, v in base.items() if k not in changed
    }
    assert derived["train"]["lr_schedule"] == "constant"
    evaluate = idrid_real.evaluate_command("EX_a_seed0", ctx)
    assert evaluate[2] == str(tmp_path / "EX_a_seed0+lr3e-4")

    ctx["lever"] = "poly"  # a schedule over the epochs 10 minutes hold: its flag wins
    poly = idrid_real.row_command("EX_a_seed0", ctx)
    assert [a for i, a in enumerate(poly) if i and poly[i - 1] == "--epochs"] == ["1000", "8"]
    assert (
        tomllib.loads(Path(poly[poly.index("--config") + 1]).read_text())["train"]["lr_schedule"]
        == "poly"
    )

    # The pair for another CPU model: the recipe unchanged, in float32 and in bf16.
    plain = idrid_real.row_command("EX_a_seed0", {**ctx, "lever": None})
    for lever, extra in (("recipe", []), ("recipe_bf16", ["--precision", "mixed_bfloat16"])):
        command = idrid_real.row_command("EX_a_seed0", {**ctx, "lever": lever})
        recipe = Path(command[command.index("--config") + 1])
        assert tomllib.loads(recipe.read_text()) == base
        at = command.index("--out")
        assert command[at + 1] == str(tmp_path / f"EX_a_seed0+{lever}")
        assert command[at + 2 :] == extra  # the flag comes last, so it wins over the recipe
        mask = {"--config", "--out"}
        same = [a for i, a in enumerate(command) if i == 0 or command[i - 1] not in mask]
        assert same[: len(same) - len(extra)] == [
            a for i, a in enumerate(plain) if i == 0 or plain[i - 1] not in mask
        ]

    # Screening levers change the recipe: 10-minute rows only; the pair runs 30 minutes.
    assert runner.check_lever("recipe_bf16", 30.0, False) == "recipe_bf16"
    assert runner.check_lever("p256", 10.0, False) == "p256"
    assert runner.check_lever(None, 30.0, False) is None
    with pytest.raises(SystemExit, match="--lever p256 is for screening rows"):
        runner.check_lever("p256", 30.0, False)
    with pytest.raises(SystemExit, match="unknown lever 'fast'"):
        runner.check_lever("fast", 10.0, False)

    results = {"rows": {"EX_a_seed0": {"ap": 0.3}}}
    assert idrid_real.pending_rows(results, ["EX_a_seed0"], "lr3e-4") == ["EX_a_seed0"]
    results["rows"]["EX_a_seed0+lr3e-4"] = {"ap": 0.4}
    assert idrid_real.pending_rows(results, ["EX_a_seed0"], "lr3e-4") == []


@pytest.mark.parametrize("lever", list(idrid_real.LEVERS))
def test_every_lever_recipe_is_written_and_loads(tmp_path, lever):
    from rmib.config import load_config
    from rmib.methods.segment_config import SegmentConfig

    base = PROJECT_ROOT / "segment" / "idrid_ex_vgg16_cbam.toml"
    cfg = load_config(SegmentConfig, idrid_real.lever_recipe(base, lever, tmp_path))
    overrides = idrid_real.LEVERS[lever][1]
    for key, value in overrides.items():
        if key == "train":
            assert {k: getattr(cfg.train, k) for k in value} == value
        elif key != "_cli":
            assert getattr(cfg, key) == value, key
    if lever == "colour":
        assert cfg.colour_jitter == 0.1 and cfg.augment == "rot90" and cfg.scale == 0.5
        assert cfg.patches_per_epoch == 256 and cfg.train.lr_schedule == "constant"
    elif "colour_jitter" not in overrides:
        assert cfg.colour_jitter == 0.0


def test_screening_renders_each_lever_under_its_row(tmp_path):
    def row(ap, lever=None):
        record = {
            "kind": idrid_real.KIND_NAMES["a"], "ap": ap, "f1": 0.5, "threshold": 0.5,
            "region_f": 0.25, "seconds_per_photograph": 9.0, "cpu": "AMD EPYC",
            "pinned": "taskset -c 0", "command": f"rmib segment {lever}",
            "epochs_trained": 4, "weights": "best", "best_epoch": 3,
        }  # fmt: skip
        if lever:
            name, (description, overrides) = lever, idrid_real.LEVERS[lever]
            record["lever"] = {"name": name, "description": description, "overrides": overrides}
        return record

    rows = {"EX_a_seed0+p256": row(0.45, "p256"), "EX_a_seed0": row(0.3)}
    text = idrid_real.render_idrid_real({"rows": rows, "minutes": 10.0}, {}, run.Settings())
    lines = [x for x in text.splitlines() if x.startswith("| EX_a_seed0")]
    assert [x.split(" | ")[0] for x in lines] == ["| EX_a_seed0", "| EX_a_seed0+p256"]
    assert "lever **p256**" in lines[1] and "| 0.450 |" in lines[1]
    assert "(4 epochs, kept best 3)" in lines[0]
    assert "not measured yet" not in text  # a screening section lists what it measured
    assert 'recipe overrides `{"scale": 0.5' in text

    cost = {"backbone": "vgg16_cbam", "size": 256, "batch": 8, "frozen_step": 5.8,
            "encoder_forward": 6.62, "decoder_step": 4.84, "frozen_over_parts": 0.506,
            "trainable_step": 23.24}  # fmt: skip
    results = {"rows": rows, "minutes": 10.0, "frozen_cost": cost, "notes": ["a finding"]}
    text = idrid_real.render_idrid_real(results, {}, run.Settings())
    assert "| 5.80 s | 6.62 s | 4.84 s | 0.51 | 23.24 s |" in text
    assert "\n- a finding\n" in text

    # A row whose stage-1 model was gone says so, with the retrained model's AUC.
    again = {"roc_auc": 0.8612, "n": 77, "run": "stage1@2026-12-07T00:00Z"}
    rows["EX_a_seed0"].update(stage1_run="stage1@2026-12-07T00:00Z", stage1_retrained=again)
    text = idrid_real.render_idrid_real({"rows": rows, "minutes": 30.0}, {}, run.Settings())
    assert (
        "(stage 1: stage1@2026-12-07T00:00Z, retrained with the row's stage-1 command, "
        "ROC AUC 0.861 on 77 validation photographs): `rmib segment None`" in text
    )


def test_the_decoder_timed_alone_is_the_segmenters_decoder():
    """frozen_encoder_cost times `decode` on the taps: the same computation as the model's."""
    import keras
    import numpy as np

    from rmib.methods.encoder_decoder.model import build_encoder_decoder, decode
    from rmib.models.backbones import build_backbone, tap_strides

    encoder = build_backbone("vgg16", weights="none", model_name="backbone")
    model = build_encoder_decoder(encoder, filters=(8, 8, 4, 4, 2))
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    taps = {k: v.numpy() for k, v in encoder(images).items()}
    inputs = {k: keras.Input(shape=(None, None, v.shape[-1]), name=k) for k, v in taps.items()}
    decoder = keras.Model(inputs, decode(inputs, tap_strides(encoder), (8, 8, 4, 4, 2)))
    for layer in decoder.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(decoder.predict(taps, verbose=0), model.predict(images, verbose=0),
                               atol=1e-6)  # fmt: skip


def test_screening_rows_render_into_their_own_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.write_markdown(out, {"idrid_real": "final rows, kept"})
    screening = tmp_path / "idrid_real_screening_10min.json"
    row = {
        "kind": idrid_real.KIND_NAMES["a"], "ap": 0.2, "f1": 0.3, "threshold": 0.5,
        "region_f": 0.1, "seconds_per_photograph": 30.0, "cpu": "AMD EPYC",
        "pinned": "taskset -c 0", "command": "rmib segment ...",
        "lever": {"name": "base", "description": "d", "overrides": {}},
    }  # fmt: skip
    idrid_real.save_results(screening, {"rows": {"EX_a_seed0+base": row}, "minutes": 10.0})
    cli.render_committed(out, screening)
    sections = run.read_sections(out)
    assert sections["idrid_real"] == "final rows, kept"
    assert "| EX_a_seed0+base | EX |" in sections["idrid_real_screening_10min"]
    assert "10-minute screening rows" in sections["idrid_real_screening_10min"]


def test_a_lever_row_retrains_the_missing_stage1_where_the_row_reads_it(tmp_path, monkeypatch):
    """With its stage-1 model gone, a lever row retrains `stage1` (not `stage1+lever`)."""
    commands = []

    def fake_run(command, log):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        if command[command.index("rmib") + 1] == "evaluate":
            out.mkdir(parents=True)
            scores = {"images": 11, "aupr": 0.4, "f1": 0.3, "threshold": 0.5,
                      "region_f_score": {"0.5": 0.2}}  # fmt: skip
            (out / "metrics.json").write_text(json.dumps(scores))
        else:
            out.mkdir(parents=True)
            (out / "rmib.json").write_text("{}")
            validation = {"roc_auc": 0.86, "accuracy": 0.8, "recall": 0.9, "precision": 0.8,
                          "n": 77}  # fmt: skip
            (out / "metrics.json").write_text(json.dumps({"validation": validation}))
        return 1.0

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr(runner, "build_stage1_view", lambda root, out: {"excluded": []})
    ctx = runner._context(False, 30.0, tmp_path, 0)
    ctx["val_names"] = list(idrid_real.VAL_NAMES)
    ctx["lever"] = "recipe_bf16"
    record = runner.run_row("EX_a_seed0", ctx, "Some CPU", echo=lambda line: None)
    pretrain, segment, evaluate = commands
    assert pretrain[:4] == ["taskset", "-c", "0", "rmib"] and pretrain[4] == "pretrain"
    assert pretrain[pretrain.index("--out") + 1] == str(tmp_path / "stage1")
    assert segment[segment.index("--encoder") + 1] == str(tmp_path / "stage1")
    assert segment[-2:] == ["--precision", "mixed_bfloat16"]
    assert evaluate[5] == str(tmp_path / "EX_a_seed0+recipe_bf16")
    assert record["stage1_retrained"]["roc_auc"] == 0.86
    assert record["stage1_run"].startswith("stage1@") and record["ap"] == 0.4


def _add_rows(path, prefix, count):
    for i in range(count):
        results = idrid_real.load_results(path)  # a stale copy, as a runner holds one
        idrid_real.add_row(path, results, f"{prefix}{i}", {"ap": 0.1})


def test_rows_finishing_together_on_two_cores_are_both_kept(tmp_path):
    """Two runners add rows to one json at once (as two pinned rows finishing in the
    same second did): every row survives."""
    import multiprocessing

    path = tmp_path / "idrid_real.json"
    idrid_real.save_results(path, {"rows": {"old": {"ap": 0.5}}, "minutes": 30.0})
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_rows, args=(path, p, 40)) for p in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    rows = idrid_real.load_results(path)["rows"]
    assert set(rows) == {"old"} | {f"{p}{i}" for p in "ab" for i in range(40)}
