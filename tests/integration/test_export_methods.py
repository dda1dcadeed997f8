"""`rmib export` of the local-global U-Net, Dual2Net and the two-stage grader.

One tiny run of each is trained once per module (library functions for the
segmenters, as tests/methods does; the CLI for the grader, as tests/methods/grading
does). Each export must reload with `tf.saved_model.load` and give, on an
odd-sized photograph, what rmib's own Python path gives: the run's
`Segmenter` (`rmib predict`) or `Grader.grade_prepared` (`rmib grade predict`).
The in-graph OpenCV INTER_AREA resize is checked bit for bit against OpenCV.
"""

from __future__ import annotations

import contextlib
import json
import re

import cv2
import numpy as np
import pytest
import tensorflow as tf

from rmib import training
from rmib.config import TrainConfig
from rmib.data import fundus, synthetic
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.data.readers import read_dataset
from rmib.errors import RmibError
from rmib.export.opencv_resize import opencv_area_resize
from rmib.methods.local_global import export as local_global_export
from tests.conftest import invoke

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions"),
]

LG_PATCH, LG_GLOBAL = 32, 64
GRADE_SIZE = 96
GRADE_FLAGS = [
    "--image-size", GRADE_SIZE, "--patch-size", 16, "--overlap", 8, "--global-size", 32,
    "--epochs", 1, "--local-epochs", 1, "--batch-size", 4, "--local-batch-size", 64,
    "--precision", "float32", "--val-fraction", 0,
]  # fmt: skip


@contextlib.contextmanager
def eagerly():
    # A step or two of tiny nets runs faster eagerly than it traces; the
    # exports themselves must be traced, so eager mode ends with training.
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


def _tiny_train(**overrides) -> TrainConfig:
    values = dict(
        epochs=1,
        batch_size=1,
        steps_per_epoch=1,
        precision="float32",
        tensorboard=False,
        monitor="loss",
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def idrid(tmp_path_factory):
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("data") / "idrid", "idrid", count=10, size=96, seed=0
    )


@pytest.fixture(scope="module")
def ex_records(idrid):
    return read_dataset(idrid).with_lesion("EX")


@pytest.fixture(scope="module")
def local_global_run(ex_records, tmp_path_factory):
    """The fused local-global U-Net, its one phase "joint" trained one step."""
    return _local_global(ex_records, tmp_path_factory.mktemp("runs") / "local_global", "float32")


def _local_global(ex_records, out, precision):
    from rmib.methods.local_global.train import train
    from rmib.methods.segment_config import LocalGlobalConfig, SegmentConfig

    cfg = SegmentConfig(
        lesion="EX",
        model="local-global",
        patch_size=LG_PATCH,
        predict_batch=3,
        augment="none",
        train=_tiny_train(batch_size=2, precision=precision),
        local_global=LocalGlobalConfig(
            global_size=LG_GLOBAL,
            base_filters=4,
            max_filters=8,
            global_depth=2,
            local_depth=2,
            phases=["joint"],
            epochs_per_phase=1,
        ),
    )
    run = training.RunDirectory(out)
    with eagerly():
        train(cfg, ex_records, [], run)
    return run.path


@pytest.fixture(scope="module")
def dual2net_run(ex_records, tmp_path_factory):
    """Dual2Net (two branches, DSM Dice loss) on a VGG16 trunk, one step."""
    return _dual2net(ex_records, tmp_path_factory.mktemp("runs") / "dual2net", "float32")


def _dual2net(ex_records, out, precision):
    from rmib.methods.dual2net.train import train
    from rmib.methods.segment_config import Dual2NetConfig, SegmentConfig

    cfg = SegmentConfig(
        data=[],
        model="dual2net",
        encoder="vgg16",
        lesion="EX",
        out=str(out),
        train=_tiny_train(precision=precision),
        dual2net=Dual2NetConfig(image_size=[32, 64], head_filters=8),
    )
    with eagerly():
        train(cfg, ex_records, [], training.RunDirectory(out), verbose=0)
    return out


@pytest.fixture(scope="module")
def grade_run(idrid, tmp_path_factory):
    """`rmib grade train`: local net, global net and the plain baseline, one epoch each."""
    return _grade(idrid, tmp_path_factory.mktemp("runs") / "grade", "float32")


def _grade(idrid, run, precision):
    flags = [*GRADE_FLAGS[: GRADE_FLAGS.index("--precision") + 1], precision]
    flags += GRADE_FLAGS[GRADE_FLAGS.index("--precision") + 2 :]
    recipe = run.parent / "tiny.toml"
    recipe.write_text("[local_train]\ntensorboard = false\n\n[train]\ntensorboard = false\n")
    with eagerly():
        result = invoke(
            ["grade", "train", "--data", idrid, "--out", run, "--config", recipe, *flags]
        )
    assert result.exit_code == 0, result.output
    return run


def _export(run, out, *flags):
    result = invoke(["export", run, "--out", out, "--check", *flags])
    assert result.exit_code == 0, result.output
    found = dict(re.findall(r"check (\S+): max abs difference (\S+)", result.output))
    return tf.saved_model.load(str(out)), {k: float(v) for k, v in found.items()}


def _inputs(signature):
    return {
        name: (spec.dtype.name, spec.shape.as_list())
        for name, spec in signature.structured_input_signature[1].items()
    }


def _one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _serve_photograph(loaded, photograph, preprocessing):
    image, _, fov = preprocess_array(photograph, Preprocessing.from_dict(preprocessing))
    served = loaded.signatures["segment_image"](image=tf.constant(image), fov=tf.constant(fov))
    return served["probability"].numpy(), served["mask"].numpy()


# --------------------------------------------------------------------------- OpenCV in the graph


@pytest.mark.parametrize(
    "source, target",
    [
        ((61, 97), (32, 51)),  # Dual2Net's shrink: non-integer factors
        ((800, 800), (256, 256)),  # the grader's I*: 3.125
        ((74, 58), (37, 29)),  # 2 x 2 blocks (uint8 halves round up)
        ((90, 60), (30, 20)),  # 3 x 3 blocks
        ((64, 96), (64, 96)),  # same size
        ((21, 29), (32, 44)),  # enlarging: OpenCV's bilinear variant
        ((40, 80), (64, 32)),  # one axis grows, the other shrinks
        ((7, 5), (1, 1)),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_opencv_area_resize_is_bit_exact(source, target, dtype):
    rng = np.random.default_rng(sum(source) + sum(target))
    image = rng.uniform(0, 255, (*source, 3)).astype(dtype)
    expected = cv2.resize(image, target[::-1], interpolation=cv2.INTER_AREA)
    got = opencv_area_resize(tf.constant(image), *target).numpy()
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- local-global


def test_local_global_export_equals_its_segmenter(local_global_run, tmp_path):
    from rmib.tasks import load_segmenter

    loaded, differences = _export(local_global_run, tmp_path / "lg")
    assert set(differences) == {"segment_patch", "segment_image"}
    assert max(differences.values()) < 1e-4
    assert _inputs(loaded.signatures["segment_patch"]) == {
        "tiles": ("float32", [None, None, None, 3]),
        "boxes": ("float32", [None, 4]),
        "global_image": ("float32", [None, LG_GLOBAL, LG_GLOBAL, 3]),
    }
    meta = json.loads((tmp_path / "lg" / "assets" / "rmib.json").read_text())
    assert (meta["kind"], meta["model"], meta["network"], meta["lesion"]) == (
        "fused",
        "local-global",
        "fused",
        "EX",
    )
    # rmib predict's defaults for the run: its patch, overlap 0.25, predict_batch.
    assert (meta["tile"], meta["overlap"], meta["tile_batch"]) == (LG_PATCH, 0.25, 3)
    assert (meta["global_size"], meta["size_multiple"]) == (LG_GLOBAL, 4)
    assert set(meta["signatures"]["segment_patch"]["inputs"]) == {"tiles", "boxes", "global_image"}

    # An odd-sized photograph, several tiles: rmib predict's map.
    photograph, _, _ = synthetic.synthesize_fundus((83, 131), seed=4, grade=3)
    segmenter = load_segmenter(local_global_run)
    expected = segmenter.predict(photograph)
    probability, mask = _serve_photograph(loaded, photograph, meta["preprocessing"])
    assert probability.shape == (83, 131) and expected.std() > 0
    np.testing.assert_allclose(probability, expected, atol=1e-4)
    np.testing.assert_array_equal(mask, (probability >= 0.5).astype(np.uint8))

    # segment_patch: one global image shared by every tile == the Keras model
    # fed one copy per tile.
    rng = np.random.default_rng(1)
    tiles = rng.uniform(0, 255, (3, LG_PATCH, LG_PATCH, 3)).astype(np.float32)
    boxes = np.array([[0, 0, 0.4, 0.3], [0.2, 0.5, 0.6, 0.8], [0.6, 0.7, 1.0, 1.0]], np.float32)
    global_image = rng.uniform(0, 255, (1, LG_GLOBAL, LG_GLOBAL, 3)).astype(np.float32)
    served = loaded.signatures["segment_patch"](
        tiles=tf.constant(tiles), boxes=tf.constant(boxes), global_image=tf.constant(global_image)
    )["probability"].numpy()
    reference = segmenter.model(
        {"global_image": np.repeat(global_image, 3, axis=0), "patch": tiles, "box": boxes}
    )["local"]
    np.testing.assert_allclose(served, np.asarray(reference), atol=1e-5)


def test_local_global_bad_tiling_is_one_error_line(local_global_run, tmp_path):
    result = invoke(["export", local_global_run, "--out", tmp_path / "o", "--tile", 34])
    _one_error_line(result, "--tile must be a multiple of 4", "34")
    result = invoke(["export", local_global_run, "--out", tmp_path / "o", "--overlap", 1.5])
    _one_error_line(result, "--overlap must be in [0, 1)", "1.5")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- Dual2Net


def test_dual2net_export_equals_its_segmenter(dual2net_run, tmp_path):
    from rmib.tasks import load_segmenter

    loaded, differences = _export(dual2net_run, tmp_path / "d2")
    assert set(differences) == {"segment_resized", "segment_image"}
    assert max(differences.values()) < 1e-4
    assert _inputs(loaded.signatures["segment_resized"]) == {
        "images": ("float32", [None, 32, 64, 3])
    }
    meta = json.loads((tmp_path / "d2" / "assets" / "rmib.json").read_text())
    assert (meta["kind"], meta["model"], meta["lesion"]) == ("resized", "dual2net", "EX")
    assert meta["input_size"] == [32, 64] and meta["resize"]["keep_aspect"] is True
    assert "tile" not in meta and meta["preprocessing"]["method"] == "clahe"

    segmenter = load_segmenter(dual2net_run)
    # Larger than the model's input (INTER_AREA shrinks) and smaller (it enlarges).
    for shape, seed in (((61, 97), 2), ((23, 29), 3)):
        painted = tuple(max(32, side) for side in shape)  # synthesize_fundus's smallest
        photograph, _, _ = synthetic.synthesize_fundus(painted, seed=seed, grade=3)
        photograph = np.ascontiguousarray(photograph[: shape[0], : shape[1]])
        expected = segmenter.predict(photograph)
        probability, _ = _serve_photograph(loaded, photograph, meta["preprocessing"])
        assert probability.shape == shape and expected.max() > 0
        np.testing.assert_allclose(probability, expected, atol=1e-4)

    result = invoke(["export", dual2net_run, "--out", tmp_path / "o", "--tile", 64])
    _one_error_line(result, "--tile and --overlap apply to tiled segmenters")


def test_dual2net_keras_format_checks_the_copy(dual2net_run, tmp_path):
    out = tmp_path / "d2.keras"
    result = invoke(["export", dual2net_run, "--format", "keras", "--out", out, "--check"])
    assert result.exit_code == 0, result.output
    assert "check segment_resized: max abs difference 0 " in result.output
    assert out.read_bytes() == (dual2net_run / "model.keras").read_bytes()


# --------------------------------------------------------------------------- grader


def test_grader_export_equals_rmib_grade_predict(grade_run, tmp_path):
    from rmib.methods.grading.grader import Grader

    loaded, differences = _export(grade_run, tmp_path / "grader")
    assert set(differences) == {"classify", "classify_plain", "classify_patch", "grade_image"}
    assert max(differences.values()) < 1e-4
    assert _inputs(loaded.signatures["grade_image"]) == {
        "image": ("uint8", [GRADE_SIZE, GRADE_SIZE, 3])
    }
    assert _inputs(loaded.signatures["classify"]) == {"images": ("float32", [None, 32, 32, 3])}
    assert _inputs(loaded.signatures["classify_patch"]) == {
        "patches": ("float32", [None, 16, 16, 3])
    }
    meta = json.loads((tmp_path / "grader" / "assets" / "rmib.json").read_text())
    assert (meta["kind"], meta["task"], meta["grades"], meta["baseline"]) == (
        "grader",
        "grade",
        4,
        True,
    )
    assert meta["grid_positions"] == list(range(0, GRADE_SIZE - 15, 8))
    assert meta["preprocessing"] == {
        "method": "graham",
        "fov_crop": True,
        "size": GRADE_SIZE,
        "centre_crop": False,
    }
    assert "grade_image" in meta["caller_preprocessing"]

    grader = Grader.load(grade_run)
    photograph, _, _ = synthetic.synthesize_fundus((77, 101), seed=6, grade=2)
    image, _ = grader.prepare(photograph)
    expected = grader.grade_prepared(image)
    served = loaded.signatures["grade_image"](image=tf.constant(image))
    served = {name: value.numpy() for name, value in served.items()}
    np.testing.assert_allclose(served["probabilities"], expected.probs, atol=1e-4)
    np.testing.assert_allclose(served["plain_probabilities"], expected.plain_probs, atol=1e-4)
    np.testing.assert_allclose(served["weights"], expected.lesion_map.weights, atol=1e-5)
    np.testing.assert_array_equal(served["labels"], expected.lesion_map.labels)
    np.testing.assert_allclose(served["patch_probabilities"], expected.lesion_map.probs, atol=1e-5)
    assert int(served["grade"]) == expected.grade and int(served["plain_grade"]) == (
        expected.plain_grade
    )
    assert expected.lesion_map.weights.std() > 0  # patches differ: a real lesion map

    with pytest.raises(tf.errors.InvalidArgumentError):  # grade_image takes image_size only
        loaded.signatures["grade_image"](image=tf.zeros((64, 64, 3), tf.uint8))


def test_grader_bad_requests_are_one_error_line(grade_run, tmp_path):
    result = invoke(["export", grade_run, "--format", "keras", "--out", tmp_path / "g.keras"])
    _one_error_line(result, "a grading run has two networks")
    result = invoke(["export", grade_run / "global_net.keras", "--out", tmp_path / "g"])
    _one_error_line(result, "takes the run directory of `rmib grade train`")
    result = invoke(["export", grade_run, "--out", tmp_path / "g", "--overlap", 0.5])
    _one_error_line(result, "not to a grader")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_segmentation_model_is_one_error_line(tmp_path):
    run = training.RunDirectory(tmp_path / "run")
    run.write_metadata({"task": "segment", "model": "unet-xl", "lesion": "EX"})
    result = invoke(["export", run.path, "--out", tmp_path / "o"])
    _one_error_line(result, "unet-xl", "encoder-decoder, local-global, dual2net")
    with pytest.raises(RmibError, match="unknown local-global network"):
        local_global_export.export({"task": "segment", "model": "local-global", "network": "both"})


# --------------------------------------------------------------------------- README serving code


def _readme_preprocess():
    from tests.integration.test_export import _readme_serving_code

    namespace = {}
    exec(compile(_readme_serving_code(), "README.md", "exec"), namespace)
    return namespace["preprocess"]


@pytest.mark.parametrize(
    "preprocessing",
    [
        Preprocessing("clahe", fov_crop=True),  # Dual2Net on DDR
        Preprocessing("graham", fov_crop=True, size=64),  # the grader
        Preprocessing("none", size=48),
    ],
)
def test_readme_preprocessing_covers_crops_and_resizes(preprocessing):
    preprocess = _readme_preprocess()
    photograph, _, _ = synthetic.synthesize_fundus((90, 121), seed=7, grade=3)
    image, fov = preprocess(photograph, preprocessing.to_dict())
    expected, _, expected_fov = preprocess_array(photograph, preprocessing)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(fov, expected_fov)
    if preprocessing.fov_crop and not preprocessing.size:
        assert (
            image.shape[:2] == fundus.crop_to_box(photograph, fundus.fov_box(photograph)).shape[:2]
        )


# --------------------------------------------------------------------------- every family in bf16


@pytest.mark.parametrize("family", ["local-global", "dual2net", "grader"])
def test_each_family_trained_in_bfloat16_exports_in_float32_and_bfloat16(
    family, ex_records, idrid, tmp_path
):
    """Issue 15: trained under mixed_bfloat16 (explicitly: emulated on CPUs without it), each
    family's export passes --check against rmib's own prediction in the same precision, in
    float32 (the default) and in the precision it was trained in."""
    from rmib.training.devices import check_tolerance, model_precision

    run = tmp_path / "run"
    if family == "local-global":
        _local_global(ex_records, run, "mixed_bfloat16")
    elif family == "dual2net":
        _dual2net(ex_records, run, "mixed_bfloat16")
    else:
        _grade(idrid, run, "mixed_bfloat16")
    assert training.read_run_metadata(run)["precision"] == "mixed_bfloat16"
    model_file = run / ("local_net.keras" if family == "grader" else "model.keras")
    assert model_precision(training.load_model(model_file)) == "mixed_bfloat16"
    for flags, precision in (([], "float32"), (["--precision", "training"], "mixed_bfloat16")):
        out = tmp_path / precision
        result = invoke(["export", run, "--out", out, "--check", *flags])
        assert result.exit_code == 0, result.output
        assert f"precision {precision}: " in result.output
        checks = re.findall(r"check (\w+): max abs difference (\S+) \(< (\S+),", result.output)
        assert len(checks) >= 2, result.output
        for _, difference, tolerance in checks:
            assert float(tolerance) == pytest.approx(check_tolerance(precision), rel=1e-3)
            assert float(difference) < check_tolerance(precision)
        stored = json.loads((out / "assets" / "rmib.json").read_text())
        assert (stored["precision"], stored["trained_precision"]) == (precision, "mixed_bfloat16")
