"""`rmib grade train|predict|evaluate` end to end on tiny synthetic IDRiD, and their maths.

The synthetic IDRiD tree has the same photographs in its segmentation part
(masks) and its grading part (grades), split about 70/30 into training and
testing sets. One module-scoped run trains every phase once (1 epoch, 96 px
images, 16 px patches, 32 px global input); the other CLI tests read it.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight

import rmib
from rmib import io
from rmib.cli import cli
from rmib.cli.grade import GLOBAL_NETS
from rmib.data import readers, synthetic
from rmib.methods.grading.data import balanced_class_weights, read_grading_data
from rmib.methods.grading.evaluate import grading_report, patch_report, resolve_split
from rmib.methods.grading.grader import Grader, lesion_map_picture
from rmib.methods.grading.grid import grid_positions
from rmib.methods.grading.lesion_map import (
    LesionMap,
    global_input,
    predict_lesion_map,
    weighted_lesion_map,
)
from rmib.methods.grading.nets import VARIANTS
from rmib.methods.grading.train import train_grader

pytestmark = pytest.mark.timeout(300)

PROJECT_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SIZE, PATCH, OVERLAP, GLOBAL = 96, 16, 8, 32
TRAIN_FLAGS = [
    "--image-size", SIZE, "--patch-size", PATCH, "--overlap", OVERLAP,
    "--global-size", GLOBAL, "--epochs", 1, "--local-epochs", 1,
    "--batch-size", 4, "--local-batch-size", 64, "--precision", "float32",
]  # fmt: skip
RUN_FILES = (
    "local_net.keras",
    "global_net.keras",
    "global_net_plain.keras",
    "history_local.csv",
    "history_global.csv",
    "history_global_plain.csv",
    "config.toml",
    "rmib.json",
    "metrics.json",
)


def invoke(*args):
    return CliRunner().invoke(cli, ["grade", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def eager():
    # Tracing the two nets' training steps takes far longer than training
    # them one step on a loaded 2-core CPU; eager execution computes the same.
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.fixture(scope="module")
def idrid(tmp_path_factory):
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("data") / "idrid", "idrid", count=10, size=SIZE, seed=0
    )


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text("[local_train]\ntensorboard = false\n\n[train]\ntensorboard = false\n")
    return path


@pytest.fixture(scope="module")
def trained(idrid, recipe, eager, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "grade"
    result = invoke("train", "--data", idrid, "--out", run, "--config", recipe, *TRAIN_FLAGS)
    assert result.exit_code == 0, result.output
    return run, result.output


# --------------------------------------------------------------------------- train


def test_train_writes_the_run(trained, idrid):
    run, output = trained
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert not (run / "work").exists()  # scratch arrays are removed
    meta = json.loads((run / "rmib.json").read_text())
    assert meta["task"] == "grade"
    assert (meta["image_size"], meta["patch_size"], meta["overlap"]) == (SIZE, PATCH, OVERLAP)
    assert (meta["grades"], meta["global_net"], meta["global_size"]) == (4, "yang", GLOBAL)
    assert meta["preprocessing"] == {
        "method": "graham", "fov_crop": True, "size": SIZE, "centre_crop": False
    }  # fmt: skip
    for phase in ("local", "global", "global_plain"):
        rows = list(csv.DictReader((run / f"history_{phase}.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1]
        assert math.isfinite(float(rows[0]["loss"]))

    # Grades: the training split of the grading part, grade-4 images left out (4 grades).
    records = readers.read_dataset(idrid).records
    graded = [r for r in records if r.grade is not None and r.split == "train"]
    data = json.loads((run / "metrics.json").read_text())["data"]
    assert data["graded_images"] == sum(r.grade < 4 for r in graded)
    assert data["left_out_grades"] == sum(r.grade == 4 for r in graded)
    assert data["masked_images"] == sum(1 for r in records if r.masks and r.split == "train")
    # Every lesion patch is kept and normal ones are sampled to one per lesion patch.
    patches = data["patches"]["train"]
    assert patches["normal"] == patches["MA"] + patches["HE"] + patches["EX"] > 0
    assert "phase local" in output and "phase global_plain" in output


def keras_input_output(path):
    """(input batch shape, units of the last layer) from a .keras archive's config.json."""
    with zipfile.ZipFile(path) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    return tuple(layers[0]["config"]["batch_shape"]), layers[-1]["config"]["units"]


def test_trained_models_have_the_configured_shapes(trained):
    run, _ = trained
    assert keras_input_output(run / "local_net.keras") == ((None, PATCH, PATCH, 3), 4)
    for name in ("global_net.keras", "global_net_plain.keras"):
        assert keras_input_output(run / name) == ((None, GLOBAL, GLOBAL, 3), 4)


def test_resume_of_a_finished_run_trains_nothing(trained, idrid, recipe):
    run, _ = trained
    before = (run / "history_global.csv").read_text()
    args = ("train", "--data", idrid, "--out", run, "--config", recipe, *TRAIN_FLAGS)
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    for phase in ("local", "global", "global_plain"):
        assert f"phase {phase}: " in result.output and "exists, done" in result.output
    assert (run / "history_global.csv").read_text() == before
    # Without --resume the run directory is refused before anything is trained.
    assert "already holds a grading run" in one_line_error(invoke(*args))


def test_strategy_flag_reaches_the_runner(idrid, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    run = tmp_path / "run"
    message = one_line_error(
        invoke("train", "--data", idrid, "--out", run, "--strategy", "multiworker")
    )
    assert "strategy multiworker needs the TF_CONFIG environment variable" in message
    assert not run.exists()


def test_on_bad_error_refuses_a_corrupt_image(tmp_path):
    tree = synthetic.write_dataset(tmp_path / "idrid", "idrid", count=4, size=64, seed=0)
    bad = tree / "A. Segmentation" / "1. Original Images" / "a. Training Set" / "IDRiD_01.jpg"
    bad.write_bytes(b"not a photograph")
    skipping = tmp_path / "skip.toml"
    skipping.write_text('on_bad = "skip"\n')
    args = ["train", "--data", tree, "--out", tmp_path / "r", "--config", skipping]
    small = ["--image-size", 64, "--patch-size", 16, "--overlap", 8]
    result = invoke(*args, *small, "--on-bad", "error")  # the flag wins over the recipe
    assert result.exit_code == 1, result.output
    # What was found is said first; then the error, one line naming the file, no traceback.
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.output
    assert "IDRiD_01.jpg: not a readable image" in lines[-1]
    assert "Traceback" not in result.output and not (tmp_path / "r" / "local_net.keras").exists()


def test_public_entry_points(trained):
    assert rmib.train_grader is train_grader
    assert rmib.METHODS["grading"].task == "grade" and rmib.METHODS["grading"].train is train_grader
    grader = rmib.load_grader(trained[0], batch_size=7)
    assert isinstance(grader, Grader) and (grader.num_classes, grader.batch_size) == (4, 7)


# --------------------------------------------------------------------------- predict


def test_predict_writes_grades_probabilities_and_maps(trained, idrid, tmp_path):
    run, _ = trained
    folder = idrid / "B. Disease Grading" / "1. Original Images" / "b. Testing Set"
    images = sorted(folder.iterdir())
    out = tmp_path / "pred"
    result = invoke("predict", run, folder, "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for row in rows:
        probs = np.array([float(row[f"prob_{g}"]) for g in range(4)])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert int(row["grade"]) == int(np.argmax(probs))
        assert int(row["plain_grade"]) in range(4)
        n = len(grid_positions(SIZE, PATCH, OVERLAP)) ** 2
        assert sum(int(row[f"patches_{c}"]) for c in ("normal", "MA", "HE", "EX")) == n
        picture = io.read_image(out / row["lesion_map"])
        assert picture.shape[1] > 2 * picture.shape[0] * 0.9  # two panels side by side
        assert f"{row['image'].rsplit('/', 1)[-1]}: grade {row['grade']}" in result.output


def test_predict_bad_inputs(trained, tmp_path):
    run, _ = trained
    message = one_line_error(invoke("predict", run, tmp_path / "nope.jpg", "--out", tmp_path))
    assert "nope.jpg" in message
    not_a_run = tmp_path / "empty_run"
    not_a_run.mkdir()
    (not_a_run / "rmib.json").write_text('{"task": "segment"}')
    image = tmp_path / "eye.png"
    io.write_image(image, np.zeros((8, 8, 3), np.uint8))
    message = one_line_error(invoke("predict", not_a_run, image, "--out", tmp_path / "o"))
    assert "not a grading run" in message and str(not_a_run) in message


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_metrics_weighted_beside_plain(trained, idrid, tmp_path):
    run, _ = trained
    out = tmp_path / "eval"
    result = invoke("evaluate", run, "--data", idrid, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test"  # the tree's own test split, held out of training
    assert "weighted" in result.output and "plain" in result.output

    rows = list(csv.DictReader((out / "per_image.csv").open()))
    truth = np.array([int(r["grade"]) for r in rows])
    assert truth.size == metrics["image"]["weighted"]["images"] > 0
    for name in ("weighted", "plain"):
        report = metrics["image"][name]
        predicted = np.array([int(r[name]) for r in rows])
        assert report["accuracy"] == pytest.approx(np.mean(truth == predicted))
        expected = cohen_kappa_score(truth, predicted, weights="quadratic", labels=range(4))
        if math.isnan(expected):
            assert report["kappa"] is None  # NaN is written as null (see "notes")
        else:
            assert report["kappa"] == pytest.approx(expected)
    assert "null" in metrics["notes"]

    # Patch level: every non-excluded patch of the test images with masks.
    patch = metrics["patch"]
    test_masked = [r for r in readers.read_dataset(idrid).records if r.masks and r.split == "test"]
    n = len(grid_positions(SIZE, PATCH, OVERLAP)) ** 2
    assert patch["images"] == len(test_masked)
    assert patch["patches"] + patch["excluded_soft_exudate_only"] == n * len(test_masked)
    assert np.sum(patch["confusion_matrix"]) == patch["patches"]
    assert (out / "patch_roc.png").is_file()


def test_evaluation_split_and_records(idrid, tmp_path):
    kaggle = synthetic.write_dataset(tmp_path / "kaggle", "kaggle", count=4, size=64, seed=0)
    assert resolve_split([idrid]) == "test"  # the tree's own test split
    assert resolve_split([kaggle]) is None and resolve_split([idrid], "all") is None
    assert resolve_split([idrid, kaggle], "valid") == "valid"
    records = readers.read_dataset(idrid).records
    for split in ("test", None):
        chosen = [r for r in records if split is None or r.split == split]
        data = read_grading_data([idrid], 4, split=split)
        assert len(data.masked) == sum(1 for r in chosen if r.masks)
        assert len(data.graded) == sum(1 for r in chosen if r.grade is not None and r.grade < 4)
        assert data.left_out_grades == sum(1 for r in chosen if r.grade == 4)
    data = read_grading_data([idrid, kaggle], 5, exclude_split="test")
    assert data.held_out == sum(1 for r in records if r.split == "test")
    assert (
        len(data.graded) == sum(1 for r in records if r.grade is not None and r.split != "test") + 4
    )


def real_subset(tmp_path) -> tuple[Path, Path]:
    """Symlinked trees of a few real photographs: EyePACS (one per grade), IDRiD_01-03 with masks."""
    eyepacs, idrid = SHARED_DATA / "eyepacs-sample", SHARED_DATA / "idrid-sample"
    if not (eyepacs.is_dir() and idrid.is_dir()):
        pytest.skip(f"real samples not found in {SHARED_DATA}")
    kaggle = tmp_path / "eyepacs"
    (kaggle / "train").mkdir(parents=True)
    rows = list(csv.reader((eyepacs / "trainLabels.csv").open()))[1:]
    chosen = [next(r for r in rows if r[1] == str(grade)) for grade in range(5)]
    with (kaggle / "trainLabels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "level"], *chosen])
    for name, _ in chosen:
        (kaggle / "train" / f"{name}.jpeg").symlink_to(eyepacs / "train" / f"{name}.jpeg")
    masks = tmp_path / "idrid"
    for source in sorted(idrid.rglob("IDRiD_0[1-3]*")):
        target = masks / source.relative_to(idrid)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    return kaggle, masks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eyepacs_grades_paired_with_idrid_masks(eager, recipe, tmp_path):
    """The EyePACS recipe's pairing on real photographs: grades from Kaggle, masks from IDRiD."""
    kaggle, idrid = real_subset(tmp_path)
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--data", kaggle, "--data", idrid, "--cache-dir", cache]
    flags = [*TRAIN_FLAGS, "--image-size", 128, "--no-baseline", "--val-fraction", 0]
    result = invoke("train", *common, "--out", run, "--config", recipe, *flags)
    assert result.exit_code == 0, result.output
    data = json.loads((run / "metrics.json").read_text())["data"]
    assert data["masked_images"] == 3  # IDRiD_01-03, none graded
    assert data["graded_images"] == 4 and data["left_out_grades"] == 1  # grade 4 left out
    assert not (run / "global_net_plain.keras").exists()
    out = tmp_path / "eval"
    result = invoke("evaluate", run, *common, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "all" and "plain" not in metrics["image"]
    assert metrics["image"]["weighted"]["images"] == 4 and metrics["patch"]["images"] == 3


# --------------------------------------------------------------------------- bad input


def test_overlap_not_smaller_than_patch_is_refused(idrid, tmp_path):
    message = one_line_error(
        invoke("train", "--data", idrid, "--out", tmp_path / "r", "--patch-size", 16,
               "--overlap", 16)
    )  # fmt: skip
    assert "overlap" in message and "16" in message
    assert not (tmp_path / "r").exists()


def test_root_without_grades_is_refused(tmp_path):
    masks_only = synthetic.write_dataset(tmp_path / "masks", "folder", count=3, size=64, seed=0)
    message = one_line_error(
        invoke("train", "--data", masks_only, "--out", tmp_path / "r", "--image-size", 64,
               "--patch-size", 16, "--overlap", 8)
    )  # fmt: skip
    assert "no graded image" in message and str(masks_only) in message


def test_root_without_masks_is_refused(tmp_path):
    grades_only = synthetic.write_dataset(tmp_path / "kaggle", "kaggle", count=3, size=64, seed=0)
    message = one_line_error(invoke("train", "--data", grades_only, "--out", tmp_path / "r"))
    assert "lesion masks for all of MA, HE and EX" in message and str(grades_only) in message


def test_evaluate_root_with_nothing_to_evaluate(trained, tmp_path):
    run, _ = trained
    plain = synthetic.write_dataset(tmp_path / "cls", "folder-classes", count=3, size=64, seed=0)
    message = one_line_error(invoke("evaluate", run, "--data", plain, "--out", tmp_path / "o"))
    assert "nothing to evaluate" in message and str(plain) in message


def test_global_net_choices_match_the_library():
    assert GLOBAL_NETS == VARIANTS


# --------------------------------------------------------------------------- maths


def test_balanced_class_weights_match_sklearn():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 3])
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    weights = balanced_class_weights(labels, 4)
    assert [weights[c] for c in range(4)] == pytest.approx(expected)
    # An absent class gets weight 1; the others are balanced over the classes present.
    assert balanced_class_weights(np.array([0, 0, 0, 1]), 3) == pytest.approx(
        {0: 4 / (2 * 3), 1: 4 / (2 * 1), 2: 1.0}
    )


def test_patch_report_by_hand():
    # true: normal, normal, MA, HE, EX, EX; predicted: normal, MA, MA, EX, EX, EX
    true = np.array([0, 0, 1, 2, 3, 3])
    probs = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.4, 0.6, 0.0, 0.0],
            [0.2, 0.8, 0.0, 0.0],
            [0.3, 0.0, 0.2, 0.5],
            [0.1, 0.0, 0.0, 0.9],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    report = patch_report(true, probs)
    assert report["confusion_matrix"] == [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 2],
    ]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["normal"] == {
        "recall": 0.5, "precision": 1.0, "support": 2, "predicted": 1
    }  # fmt: skip
    assert report["per_class"]["MA"]["precision"] == pytest.approx(0.5)
    assert report["per_class"]["HE"] == {"recall": 0.0, "precision": 1.0, "support": 1,
                                         "predicted": 0}  # fmt: skip
    assert report["per_class"]["EX"]["precision"] == pytest.approx(2 / 3)
    auc = roc_auc_score(true > 0, 1 - probs[:, 0])
    assert report["lesion_vs_normal"]["roc_auc"] == pytest.approx(auc)


def test_grading_report_matches_sklearn():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 40)
    probs = rng.dirichlet(np.ones(4), 40)
    probs[np.arange(40), true] += 0.5 * (rng.random(40) < 0.6)  # better than chance
    probs /= probs.sum(axis=1, keepdims=True)
    report = grading_report(true, probs, 4)
    predicted = probs.argmax(axis=1)
    assert report["kappa"] == pytest.approx(cohen_kappa_score(true, predicted, weights="quadratic"))
    assert report["accuracy"] == pytest.approx(np.mean(true == predicted))
    assert report["referable_dr"]["roc_auc"] == pytest.approx(
        roc_auc_score(true >= 2, probs[:, 2:].sum(axis=1))
    )
    assert report["any_dr"]["roc_auc"] == pytest.approx(roc_auc_score(true >= 1, 1 - probs[:, 0]))
    # One class only: kappa and ROC AUC are undefined (NaN, written as null).
    single = grading_report(np.zeros(3, int), np.tile([0.7, 0.1, 0.1, 0.1], (3, 1)), 4)
    assert math.isnan(single["kappa"]) and math.isnan(single["referable_dr"]["roc_auc"])
    assert single["accuracy"] == 1.0


def test_global_input_scales_by_m_over_4_then_resizes():
    image = np.full((64, 64, 3), 200, np.uint8)
    weights = np.full((64, 64), 4.0, np.float32)
    weights[:, 32:] = 1.0  # right half: a sure normal patch, weight 1 -> I / 4
    out = global_input(image, 32, weights)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.all(out[:, :15] == 200) and np.all(out[:, 17:] == 50)
    assert np.array_equal(global_input(image, 32), np.full((32, 32, 3), 200, np.uint8))


def test_lesion_map_of_a_stub_network_by_hand():
    size, patch, overlap = 48, 16, 8
    image = np.zeros((size, size, 3), np.uint8)
    image[:16, :16] = 255  # only the top-left patch is wholly bright

    def stub(patches):  # exudate (class 3) at p = 0.8 where bright, else sure normal
        bright = patches.reshape(len(patches), -1).mean(axis=1) > 200
        probs = np.tile(np.float32([1, 0, 0, 0]), (len(patches), 1))
        probs[bright] = [0.2, 0, 0, 0.8]
        return probs

    found = predict_lesion_map(stub, image, patch, overlap, batch_size=4)
    n = len(grid_positions(size, patch, overlap))  # offsets 0, 8, 16, 24, 32
    expected = np.zeros((n, n), int)
    expected[0, 0] = 3
    assert np.array_equal(found.labels, expected)
    assert found.probs[0, 0] == pytest.approx(0.8) and found.class_probs.shape == (n * n, 4)
    # Pixel (0, 0) lies in the top-left patch only: (3 + 1) * 0.8. Pixel (8, 8) lies in
    # four patches, one of them the exudate: (3.2 + 1 + 1 + 1) / 4. The far corner: 1.
    assert found.weights[0, 0] == pytest.approx(3.2)
    assert found.weights[8, 8] == pytest.approx(6.2 / 4)
    assert found.weights[-1, -1] == pytest.approx(1.0)


def test_lesion_map_picture_outlines_lesion_patches_in_their_colour():
    image = np.full((64, 64, 3), 100, np.uint8)
    labels = np.zeros((7, 7), int)  # grid_positions(64, 16, 8): 7 per side
    probs = np.ones((7, 7), np.float32)
    plain = lesion_map_picture(
        image, LesionMap(weighted_lesion_map(labels, probs, 64, 16, 8), labels, probs, None), 16, 8
    )
    labels[3, 3] = 3
    marked = lesion_map_picture(
        image, LesionMap(weighted_lesion_map(labels, probs, 64, 16, 8), labels, probs, None), 16, 8
    )

    def hue(sheet, channel):  # pixels where one channel leads the others by 30 levels
        sheet = sheet.astype(int)
        others = [c for c in range(3) if c != channel]
        return (sheet[..., channel] > sheet[..., others[0]] + 30) & (
            sheet[..., channel] > sheet[..., others[1]] + 30
        )

    yellow = (marked[..., 0] > 230) & (marked[..., 1] > 230) & (marked[..., 2] < 60)
    assert yellow.any() and not ((plain[..., 0] > 230) & (plain[..., 2] < 60)).any()
    # Green heat only where M > 1: at the patch centre M = (4 + 1 + 1 + 1) / 4, heat 0.25.
    assert hue(marked, 1).any() and not hue(plain, 1).any()
