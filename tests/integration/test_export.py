"""`rmib export`: SavedModel signatures, checks, atomic writes, Keras/TFLite, serving without rmib."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rmib import io, tasks, training
from rmib.data import synthetic
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.export import archive
from tests.conftest import PROJECT_ROOT, invoke

pytestmark = pytest.mark.timeout(900)

TILE = 64  # the fixture's patch size; whole-image tests need several tiles per photograph


@pytest.fixture(scope="module")
def classifier_export(pretrain_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "classifier"
    result = invoke(["export", pretrain_run, "--out", out, "--check"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def segmenter_export(segment_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "segmenter"
    result = invoke(["export", segment_run, "--out", out, "--tile", TILE, "--check"])
    assert result.exit_code == 0, result.output
    return out, result.output


def _inputs(signature):
    return {
        name: (spec.dtype.name, spec.shape.as_list())
        for name, spec in signature.structured_input_signature[1].items()
    }


def _difference(output_text, name):
    match = re.search(rf"check {name}: max abs difference (\S+)", output_text)
    assert match, output_text
    return float(match.group(1))


# --------------------------------------------------------------------------- SavedModel


def test_classifier_savedmodel_has_a_documented_classify_signature(classifier_export, pretrain_run):
    import tensorflow as tf

    out, output = classifier_export
    assert _difference(output, "classify") < 1e-4
    loaded = tf.saved_model.load(str(out))
    assert {"classify", "metadata"} <= set(loaded.signatures)
    assert _inputs(loaded.signatures["classify"]) == {"images": ("float32", [None, 64, 64, 3])}
    assert set(loaded.signatures["classify"].structured_outputs) == {"probability"}

    stored = json.loads((out / "assets" / "rmib.json").read_text())
    served = json.loads(loaded.signatures["metadata"]()["json"].numpy())
    assert stored == served
    run = training.read_run_metadata(pretrain_run)
    assert stored["task"] == "pretrain" and stored["threshold"] == run["threshold"]
    assert stored["preprocessing"] == run["preprocessing"]
    assert stored["signatures"]["classify"]["outputs"]["probability"]["shape"] == [None, 1]

    # A real photograph through the run's preprocessing: served == Keras.
    photograph, _, _ = synthetic.synthesize_fundus(120, seed=5)
    image, _, _ = preprocess_array(photograph, Preprocessing.from_dict(run["preprocessing"]))
    batch = image[None].astype(np.float32)
    served = loaded.signatures["classify"](images=tf.constant(batch))["probability"].numpy()
    keras_model = training.load_model(pretrain_run)
    expected = np.asarray(keras_model(batch, training=False))
    assert served.shape == (1, 1)
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_segmenter_savedmodel_signatures_and_metadata(segmenter_export, segment_run):
    import tensorflow as tf

    from rmib.tasks import load_segmenter

    out, output = segmenter_export
    assert _difference(output, "segment_patch") < 1e-4
    assert _difference(output, "segment_image") < 1e-4
    loaded = tf.saved_model.load(str(out))
    assert _inputs(loaded.signatures["segment_patch"]) == {
        "tiles": ("float32", [None, None, None, 3])
    }
    assert _inputs(loaded.signatures["segment_image"]) == {
        "image": ("uint8", [None, None, 3]),
        "fov": ("uint8", [None, None]),
    }
    assert set(loaded.signatures["segment_image"].structured_outputs) == {"probability", "mask"}
    meta = json.loads((out / "assets" / "rmib.json").read_text())
    assert (meta["task"], meta["lesion"], meta["model"]) == ("segment", "EX", "encoder-decoder")
    assert (meta["tile"], meta["overlap"], meta["threshold"]) == (TILE, 0.125, 0.5)
    assert meta["preprocessing"]["method"] == "clahe"
    assert "CLAHE clip 1.5" in meta["caller_preprocessing"]

    # A photograph of odd size, no field-of-view mask (fov of shape (0, 0)): equals
    # rmib's own tiled prediction without a mask, and the mask is its threshold.
    photograph, _, _ = synthetic.synthesize_fundus((90, 141), seed=3)
    segmenter = load_segmenter(segment_run, tile=TILE)
    image, _, _ = preprocess_array(photograph, segmenter.preprocessing)
    expected = segmenter.predict_prepared(image, None)
    served = loaded.signatures["segment_image"](
        image=tf.constant(image), fov=tf.zeros((0, 0), tf.uint8)
    )
    probability, mask = served["probability"].numpy(), served["mask"].numpy()
    assert probability.shape == mask.shape == (90, 141) and mask.dtype == np.uint8
    assert expected.std() > 0  # a constant map would hide tiling mistakes
    np.testing.assert_allclose(probability, expected, atol=1e-4)
    np.testing.assert_array_equal(mask, (probability >= 0.5).astype(np.uint8))

    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["segment_image"](image=tf.constant(image), fov=tf.ones((5, 5), tf.uint8))


def _readme_serving_code() -> str:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Serving a SavedModel", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("method", ["clahe", "graham", "none"])
def test_readme_preprocessing_equals_rmibs(method):
    from rmib.data import fundus

    namespace = {}
    exec(compile(_readme_serving_code(), "README.md", "exec"), namespace)
    # (1300, 1500): the field of view is found on a downscaled copy, then scaled back.
    for size, seed in [(96, 0), ((150, 170), 1), ((1300, 1500), 2)]:
        photograph, _, _ = synthetic.synthesize_fundus(size, seed=seed, grade=3)
        image, fov = namespace["preprocess"](photograph, {"centre_crop": True, "method": method})
        expected, _, expected_fov = preprocess_array(
            photograph, Preprocessing(method, centre_crop=True)
        )
        np.testing.assert_array_equal(fov, fundus.fov_mask(photograph))
        np.testing.assert_array_equal(fov, expected_fov)
        np.testing.assert_array_equal(image, expected)


def test_savedmodel_served_without_rmib_matches_rmib_predict(
    segmenter_export, segment_run, tmp_path
):
    from rmib.predict import read_probability_png

    photograph, _, _ = synthetic.synthesize_fundus((150, 170), seed=11, grade=3)
    image_path = tmp_path / "photo.png"
    io.write_image(image_path, photograph)
    predicted = tmp_path / "predicted"
    result = invoke(["predict", segment_run, image_path, "--out", predicted, "--tile", TILE])
    assert result.exit_code == 0, result.output
    expected = read_probability_png(predicted / "photo_prob.png")
    expected_mask = io.read_mask(predicted / "photo_mask.png")

    (tmp_path / "serving.py").write_text(_readme_serving_code(), encoding="utf-8")
    (tmp_path / "serve.py").write_text(
        "import sys\n"
        "import numpy as np\n"
        "from serving import segment_photograph\n"
        "probability, mask = segment_photograph(sys.argv[1], sys.argv[2])\n"
        "np.save(sys.argv[3], probability)\n"
        "np.save(sys.argv[4], mask)\n"
        "assert 'rmib' not in sys.modules, 'rmib was imported'\n"
        "print('served without rmib')\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [
            sys.executable,
            "serve.py",
            str(segmenter_export[0]),
            str(image_path),
            "prob.npy",
            "mask.npy",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served without rmib" in done.stdout
    probability = np.load(tmp_path / "prob.npy")
    mask = np.load(tmp_path / "mask.npy")
    assert probability.shape == expected.shape == (150, 170)
    assert expected.std() > 0
    np.testing.assert_allclose(probability, expected, atol=1e-3)
    near_threshold = np.abs(expected - 0.5) < 1e-3
    assert np.array_equal(
        mask.astype(bool) | near_threshold, expected_mask.astype(bool) | near_threshold
    )


# --------------------------------------------------------------------------- atomic writes, failed checks


def test_an_interrupted_export_leaves_no_partial_folder(segment_run, tmp_path, monkeypatch):
    def interrupted(folder, exporter, model, metadata, patch_size=None):
        (folder / "saved_model.pb").write_bytes(b"half of it")
        raise KeyboardInterrupt

    monkeypatch.setattr(archive, "write_savedmodel", interrupted)
    target = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        tasks.export_model(segment_run, target, tile=TILE)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder

    target.mkdir()
    (target / "old.txt").write_text("previous export")
    with pytest.raises(KeyboardInterrupt):
        tasks.export_model(segment_run, target, tile=TILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert (target / "old.txt").read_text() == "previous export"


def test_a_failed_check_exits_1_and_writes_nothing(pretrain_run, tmp_path, monkeypatch):
    from rmib.training import devices as precision

    monkeypatch.setattr(precision, "check_tolerance", lambda name: 0.0)  # every difference fails
    out = tmp_path / "model.keras"
    result = invoke(["export", pretrain_run, "--format", "keras", "--out", out, "--check"])
    assert result.exit_code == 1
    assert "export check failed" in result.output and "tolerance 0" in result.output
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- keras, tflite


def test_keras_format_copies_the_model_file(segment_run, tmp_path):
    out = tmp_path / "sub" / "ex.keras"
    result = invoke(["export", segment_run, "--format", "keras", "--out", out, "--check"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (segment_run / "model.keras").read_bytes()
    assert _difference(result.output, "segment_patch") == 0.0
    assert training.read_run_metadata(out)["lesion"] == "EX"
    assert [p.name for p in out.parent.iterdir()] == ["ex.keras"]


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_classifier_matches_keras(pretrain_run, tmp_path):
    import tensorflow as tf

    out = tmp_path / "classifier.tflite"
    # The classifier converts on the pinned TensorFlow: a conversion error is a failure.
    result = tasks.export_model(pretrain_run, out, "tflite", check=True)
    assert result.signatures == ["classify"] and result.differences["classify"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.tflite"]

    interpreter = tf.lite.Interpreter(model_path=str(out))
    runner = interpreter.get_signature_runner("classify")
    batch = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    served = runner(images=batch)["probability"]
    expected = np.asarray(training.load_model(pretrain_run)(batch, training=False))
    assert served.shape == (3, 1)
    np.testing.assert_allclose(served, expected, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def _one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = invoke(["export", tmp_path, "--out", tmp_path / "out"])
    _one_error_line(result, str(tmp_path), "not an rmib run directory")
    assert not (tmp_path / "out").exists()


def test_a_tile_that_is_not_a_multiple_of_32_is_one_error_line(segment_run, tmp_path):
    result = invoke(["export", segment_run, "--out", tmp_path / "out", "--tile", 48])
    _one_error_line(result, "--tile must be a multiple of 32, got 48")
    assert list(tmp_path.iterdir()) == []
