"""The fused local-global U-Net (Yan et al., ISBI 2019): loss, crop, phases, data, segmenter."""

import dataclasses
import math

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib.config import TrainConfig, load_config
from rmib.data.pipeline import Example
from rmib.methods.local_global.config import PHASES, Sizes, phase_config, resolve_sizes
from rmib.methods.local_global.data import (
    Photographs,
    augment_soft_pair,
    fused_dataset,
    rotate_fused_example,
)
from rmib.methods.local_global.loss import combined_loss, kernels_of
from rmib.methods.local_global.model import (
    GlobalFeatureCrop,
    build_global_net,
    build_local_global,
    build_local_net,
    build_single_net,
    copy_matching_weights,
    crop_global_features,
    default_depths,
    pad_global_features,
    resize_global,
)
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter
from rmib.methods.local_global.train import _compile_arguments, _phase_model_builder, train
from rmib.methods.segment_config import LocalGlobalConfig, SegmentConfig
from rmib.tasks import SEGMENT_METHODS

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions"),
]
LN2 = math.log(2.0)
SEGMENT_DIR = __import__("pathlib").Path(__file__).resolve().parents[3] / "segment"


@pytest.fixture
def eager():
    # Tracing a train step of two U-Nets takes far longer than running a few
    # tiny steps eagerly on a busy CPU.
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def reference_eq2(y_true, y_prob, gamma):
    """Eq. 2 per image (positive weight |Y-| / (gamma |Y+|)), divided by the pixel count."""
    per_image = []
    for truth, prob in zip(y_true, np.clip(y_prob.astype(np.float64), 1e-7, 1 - 1e-7), strict=True):
        truth, prob = truth.ravel(), prob.ravel()
        n_pos = truth.sum()
        weight = (truth.size - n_pos) / (gamma * n_pos) if n_pos else 0.0
        positive = np.sum(truth * np.log(prob))
        negative = np.sum((1 - truth) * np.log(1 - prob))
        per_image.append(-(weight * positive + negative) / truth.size)
    return float(np.mean(per_image))


def tiny_fused(l2=0.0, global_size=16):
    return build_local_global(2, 2, base_filters=2, max_filters=4, global_size=global_size, l2=l2)


def fused_batch(rng, batch=2, global_size=16, patch=8):
    x = {
        "global_image": rng.uniform(0, 255, (batch, global_size, global_size, 3)).astype("f4"),
        "patch": rng.uniform(0, 255, (batch, patch, patch, 3)).astype("f4"),
        "box": np.array([[0.0, 0.0, 0.25, 0.25], [0.5, 0.25, 0.75, 0.5]], "f4")[:batch],
    }
    y = {
        "global": (rng.uniform(size=(batch, global_size, global_size, 1)) > 0.7).astype("f4"),
        "local": (rng.uniform(size=(batch, patch, patch, 1)) > 0.7).astype("f4"),
    }
    y["local"][1] = 0.0  # a patch without lesion: its negative term only
    return x, y


# ------------------------------------------------------------------ loss (eq. 1)


def test_combined_loss_hand_worked():
    # Global: 1 lesion pixel of 4, p = 0.5: w = 3, L = (3 + 3) ln2 / 4 = 1.5 ln2.
    # Local: no lesion, p = 0.5: L = ln 2. Kernels 1, 2: phi = 1 + 4 = 5.
    # L = 1 * 1.5 ln2 + 1 * ln2 + 0.1 * 5 = 2.5 ln2 + 0.5.
    y_global = np.array([[[1.0], [0.0]], [[0.0], [0.0]]], "f4")[None]
    y_local = np.zeros((1, 2, 2, 1), "f4")
    half = np.full((1, 2, 2, 1), 0.5, "f4")
    kernels = [np.array([1.0], "f4"), np.array([[2.0]], "f4")]
    value = combined_loss(y_global, half, y_local, half, kernels, (1.0, 1.0, 0.1))
    assert float(value) == pytest.approx(2.5 * LN2 + 0.5, rel=1e-6)
    # Weights l1 = 2, l2 = 0: 3 ln2; gamma 3 halves... w = 1: (1 + 3) ln2 / 4 = ln2.
    value = combined_loss(y_global, half, y_local, half, kernels, (2.0, 0.0, 0.0), gamma=3.0)
    assert float(value) == pytest.approx(2.0 * LN2, rel=1e-6)


def test_combined_loss_against_numpy():
    rng = np.random.default_rng(3)
    y_global = (rng.uniform(size=(3, 8, 8, 1)) > 0.8).astype("f4")
    y_global[2] = 0.0
    y_local = (rng.uniform(size=(3, 4, 4, 1)) > 0.6).astype("f4")
    p_global = rng.uniform(0.01, 0.99, y_global.shape).astype("f4")
    p_local = rng.uniform(0.01, 0.99, y_local.shape).astype("f4")
    kernels = [
        rng.normal(size=(3, 3, 2, 4)).astype("f4"),
        rng.normal(size=(1, 1, 4, 1)).astype("f4"),
    ]
    lambdas, gamma = (0.7, 1.3, 0.01), 2.0
    expected = (
        0.7 * reference_eq2(y_global, p_global, gamma)
        + 1.3 * reference_eq2(y_local, p_local, gamma)
        + 0.01 * sum(float(np.sum(k.astype(np.float64) ** 2)) for k in kernels)
    )
    got = combined_loss(y_global, p_global, y_local, p_local, kernels, lambdas, gamma)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_the_fused_model_trains_on_eq1(eager):
    # The loss train() compiles (weighted outputs + the L2 regularisers) is eq. 1.
    cfg = SegmentConfig(
        lesion="MA",
        gamma=2.0,
        local_global=LocalGlobalConfig(lambda_global=0.7, lambda_local=1.3, lambda_l2=0.01),
    )
    model = tiny_fused(l2=cfg.local_global.lambda_l2)
    arguments = _compile_arguments("joint", cfg)
    model.compile(
        optimizer="adam", loss=arguments["loss"], run_eagerly=True, **arguments["compile_kwargs"]
    )
    x, y = fused_batch(np.random.default_rng(4))
    pred = model.predict(x, verbose=0)
    kernels = kernels_of(model)
    assert len(kernels) == len(model.losses) > 10  # every convolution is regularised
    expected = (
        0.7 * reference_eq2(y["global"], pred["global"], 2.0)
        + 1.3 * reference_eq2(y["local"], pred["local"], 2.0)
        + 0.01 * sum(float(np.sum(np.asarray(k, np.float64) ** 2)) for k in kernels)
    )
    got = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------ fusion crop


def coordinate_map(grid_h, grid_w, offset=0.0):
    """A global feature map whose channel 0 is the normalised y of its pixel centres, 1 the x."""
    ys = (np.arange(grid_h) + 0.5) / grid_h
    xs = (np.arange(grid_w) + 0.5) / grid_w
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return (np.stack([yy, xx], -1) + offset).astype("f4")


def test_crop_returns_exactly_the_patch_region_at_the_patch_scale():
    # A 96 x 128 photograph whose global map is 20 x 30 (not an integer scale).
    height, width, patch = 96, 128, 16
    features = coordinate_map(20, 30)[None]
    top, left = 37, 58
    box = np.array([[top / height, left / width, (top + patch) / height, (left + patch) / width]])
    local = np.zeros((1, patch, patch, 5), "f4")
    crop = np.asarray(GlobalFeatureCrop()([features, box.astype("f4"), local]))
    assert crop.shape == (1, patch, patch, 2)
    expect_y = (top + np.arange(patch) + 0.5) / height
    expect_x = (left + np.arange(patch) + 0.5) / width
    np.testing.assert_allclose(
        crop[0, :, :, 0], np.broadcast_to(expect_y[:, None], (16, 16)), atol=1e-6
    )
    np.testing.assert_allclose(
        crop[0, :, :, 1], np.broadcast_to(expect_x[None, :], (16, 16)), atol=1e-6
    )


def test_crop_at_the_edges_holds_the_edge_value_and_boxes_share_one_map():
    height, width, patch = 64, 64, 16
    features = coordinate_map(8, 8)[None]  # one photograph, three tiles
    corners = [(0, 0), (48, 48), (0, 24)]
    boxes = np.array(
        [[t / height, x / width, (t + patch) / height, (x + patch) / width] for t, x in corners],
        "f4",
    )
    crops = crop_global_features(features, boxes, (patch, patch)).numpy()
    for crop, (top, left) in zip(crops, corners, strict=True):
        # Beyond the outermost global pixel centres (1/16 and 15/16) the map is held.
        expect_y = np.clip((top + np.arange(patch) + 0.5) / height, 1 / 16, 15 / 16)
        expect_x = np.clip((left + np.arange(patch) + 0.5) / width, 1 / 16, 15 / 16)
        np.testing.assert_allclose(crop[:, 0, 0], expect_y, atol=1e-6)
        np.testing.assert_allclose(crop[0, :, 1], expect_x, atol=1e-6)
    # Padded once beforehand (whole-photograph prediction): the same expected coordinates.
    again = crop_global_features(
        pad_global_features(features), boxes, (patch, patch), padded=True
    ).numpy()
    np.testing.assert_array_equal(again, crops)


def test_each_box_reads_its_own_map_in_a_training_batch():
    features = np.stack([coordinate_map(8, 8, offset=b) for b in range(3)])
    boxes = np.tile(np.array([[0.25, 0.25, 0.5, 0.5]], "f4"), (3, 1))
    crops = crop_global_features(features, boxes, (8, 8)).numpy()
    for b in range(3):
        np.testing.assert_allclose(crops[b] - crops[0], b, atol=1e-6)


# ------------------------------------------------------------------ phases 3 and 4


def test_fusion_phase_freezes_everything_before_the_fusion_module_and_joint_unfreezes(eager):
    sizes = Sizes(16, 8, 2, 2, 2, 4, 2)
    rng = np.random.default_rng(5)
    x, y = fused_batch(rng)
    cfg = SegmentConfig(lesion="EX")
    arguments = _compile_arguments("fusion", cfg)

    def step(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=arguments["loss"],
            run_eagerly=True,
            **arguments["compile_kwargs"],
        )
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)

    fusion = _phase_model_builder("fusion", sizes, 1e-4, {})()
    before = {w.path: np.array(w) for w in fusion.weights}
    step(fusion)
    after = {w.path: np.array(w) for w in fusion.weights}
    fusion_paths = [p for p in before if p.startswith("fusion_head")]
    other_paths = [p for p in before if not p.startswith("fusion_head")]
    assert fusion_paths and len(other_paths) > len(fusion_paths)
    for path in other_paths:  # kernels, batch-norm parameters and statistics alike
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    moved = [p for p in fusion_paths if not np.array_equal(after[p], before[p])]
    assert set(moved) == set(fusion_paths)

    joint = _phase_model_builder("joint", sizes, 1e-4, {"fusion": fusion})()
    start = {w.path: np.array(w) for w in joint.weights}
    for path, value in after.items():  # phase 4 starts where phase 3 ended
        np.testing.assert_array_equal(start[path], value, err_msg=path)
    step(joint)
    end = {w.path: np.array(w) for w in joint.weights}
    kernels = [p for p in other_paths if p.endswith("/kernel")]
    assert any(p.startswith("global_trunk") for p in kernels)
    assert any(p.startswith("local_trunk") for p in kernels)
    unchanged = [p for p in kernels if np.array_equal(end[p], start[p])]
    assert unchanged == []


# ------------------------------------------------------------------ augmentation and data


def test_quarter_turns_keep_photograph_patch_and_box_consistent():
    height, width, patch = 24, 40, 8  # not square: the box must follow the swapped sides
    index = np.arange(height * width, dtype="f4").reshape(height, width)
    image = np.stack([index, index % 7, np.zeros_like(index)], -1)
    top, left = 5, 22
    image[top + 1, left + 6, 2] = 1000.0  # a unique marker inside the patch
    mask = (index % 3 == 0).astype("f4")[..., None]
    box = np.array(
        [top / height, left / width, (top + patch) / height, (left + patch) / width], "f4"
    )
    cut = image[top : top + patch, left : left + patch]
    cut_mask = mask[top : top + patch, left : left + patch]
    for k in range(4):
        turned, turned_mask, p, p_mask, b = (
            np.asarray(t) for t in rotate_fused_example(image, mask, cut, cut_mask, box, k)
        )
        np.testing.assert_array_equal(turned, np.rot90(image, k))
        h, w = turned.shape[:2]
        y0, x0, y1, x1 = np.asarray(b) * [h, w, h, w]
        corners = np.round([y0, x0, y1, x1]).astype(int)
        np.testing.assert_allclose([y0, x0, y1, x1], corners, atol=1e-4)
        y0, x0, y1, x1 = corners
        assert (y1 - y0, x1 - x0) == (patch, patch)
        np.testing.assert_array_equal(turned[y0:y1, x0:x1], p)
        np.testing.assert_array_equal(turned_mask[y0:y1, x0:x1], p_mask)
        np.testing.assert_array_equal(p, np.rot90(cut, k))
        assert p[..., 2].max() == 1000.0


def test_global_augmentation_keeps_lesion_fractions_and_geometry():
    image = np.zeros((16, 16, 3), "f4")
    image[4:8, 2:6] = 200.0
    mask = np.zeros((16, 16, 1), "f4")
    mask[4:8, 2:6] = 0.25  # a lesion covering a quarter of each GlobalNet pixel
    seed = tf.constant([3, 4], tf.int64)
    out_image, out_mask = (
        np.asarray(t) for t in augment_soft_pair(image, mask, seed, noise_std=0.0)
    )
    assert 0.0 < out_mask.max() <= 0.25 + 1e-6  # fractions, not rounded to 0 or 1
    bright = out_image[..., 0] > 100
    covered = out_mask[..., 0] > 0.125
    assert bright.sum() > 4 and (bright == covered).mean() > 0.95  # same transformation
    assert not np.array_equal(out_mask, mask)


def test_fused_dataset_patches_lie_at_their_boxes(tmp_path):
    # A square photograph as large as global_size: its GlobalNet view is itself,
    # so every (rotated) patch must be the global image cut at its (rotated) box.
    size, patch = 32, 8
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([yy * 7, xx * 7, (yy * 3 + xx) % 5], -1).astype(np.uint8)
    mask = ((yy // 4 + xx // 4) % 5 == 0).astype(np.uint8)
    example = Example("one", image, mask, np.ones((size, size), np.uint8))
    photos = Photographs(
        [example], [resize_global(image, size)], [resize_global(mask.astype("f4"), size)]
    )
    ds = fused_dataset(photos, patch, batch_size=4, steps=3, pos_fraction=0.5, seed=1)
    turned_any = False
    for inputs, targets in ds:
        for i in range(4):
            g = inputs["global_image"][i].numpy()
            y0, x0, y1, x1 = np.round(inputs["box"][i].numpy() * size).astype(int)
            np.testing.assert_array_equal(g[y0:y1, x0:x1], inputs["patch"][i].numpy())
            np.testing.assert_array_equal(
                targets["global"][i].numpy()[y0:y1, x0:x1], targets["local"][i].numpy()
            )
            turned_any |= not np.array_equal(g, image.astype("f4"))
    assert turned_any


# ------------------------------------------------------------------ segmenter


def fused_metadata(**extra):
    return {
        "task": "segment",
        "model": "local-global",
        "network": "fused",
        "lesion": "EX",
        "preprocessing": {"method": "none", "centre_crop": True},
        "global_size": 16,
        "patch_size": 8,
        "depths": {"global": 2, "local": 2},
        **extra,
    }


def test_segmenter_runs_globalnet_once_and_matches_the_fused_model(eager):
    assert SEGMENT_METHODS["local-global"].segmenter is LocalGlobalSegmenter
    model = tiny_fused()
    segmenter = LocalGlobalSegmenter(model, fused_metadata(), overlap=0.0, batch_size=5)
    calls = []
    global_features = segmenter._global_features
    segmenter._global_features = lambda image: calls.append(1) or global_features(image)
    image = np.random.default_rng(6).uniform(0, 255, (16, 24, 3)).astype("f4")
    prob = segmenter.predict_prepared(image)
    assert calls == [1]  # 6 tiles, one GlobalNet pass
    small = resize_global(image, 16)[None]
    for top in range(0, 16, 8):
        for left in range(0, 24, 8):
            box = [[top / 16, left / 24, (top + 8) / 16, (left + 8) / 24]]
            tile = image[None, top : top + 8, left : left + 8]
            out = model({"global_image": small, "patch": tile, "box": np.array(box, "f4")})
            np.testing.assert_allclose(
                prob[top : top + 8, left : left + 8], out["local"][0, ..., 0], atol=1e-5
            )


def test_single_net_segmenters_of_the_ablation(eager):
    image = np.random.default_rng(7).uniform(0, 255, (24, 32, 3)).astype("f4")
    global_net = build_global_net(2, 2, 4)
    segmenter = LocalGlobalSegmenter(global_net, fused_metadata(network="global"))
    coarse = global_net(resize_global(image, 16)[None]).numpy()[0, ..., 0]
    expected = cv2.resize(coarse, (32, 24), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(segmenter.predict_prepared(image), expected, atol=1e-6)

    local_net = build_local_net(2, 2, 4)
    segmenter = LocalGlobalSegmenter(local_net, fused_metadata(network="local"), overlap=0.0)
    prob = segmenter.predict_prepared(image)
    np.testing.assert_allclose(
        prob[8:16, 16:24], local_net(image[None, 8:16, 16:24])[0, ..., 0], atol=1e-5
    )


def test_single_nets_carry_the_fused_models_names_and_load_into_it():
    fused = build_local_global(2, 1, 2, 4, 16)
    for net, build in (("global", build_global_net), ("local", build_local_net)):
        model = build(2 if net == "global" else 1, 2, 4)
        assert model.name == f"{net}_net"
        assert [layer.name for layer in model.layers[1:]] == [f"{net}_trunk", f"{net}_head"]
        # Every weight moves into the fused model but LocalNet's head (fusion_head replaces it).
        moved = model.weights if net == "global" else model.get_layer("local_trunk").weights
        assert copy_matching_weights(model, fused) == len(moved) > 0
    with pytest.raises(ValueError, match="net must be one of global, local, got 'fusion'"):
        build_single_net("fusion", 2)


def test_segmenter_skips_the_centre_crop_for_small_photographs_and_checks_the_tile(eager):
    model = tiny_fused()
    segmenter = LocalGlobalSegmenter(model, fused_metadata(), batch_size=64)
    photo = np.random.default_rng(8).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    prob = segmenter.predict(photo)
    assert prob.shape == (40, 56) and 0.0 <= prob.min() and prob.max() <= 1.0
    with pytest.raises(Exception, match="multiple of 4"):
        LocalGlobalSegmenter(model, fused_metadata(), tile=10)


# ------------------------------------------------------------------ settings and recipes


def test_sizes_follow_the_paper_unless_set():
    assert default_depths("EX") == {"global": 6, "local": 3}
    assert default_depths("HE") == {"global": 6, "local": 6}
    assert default_depths("SE") == {"global": 4, "local": 6}
    assert default_depths("MA") == {"global": 3, "local": 3}
    sizes = resolve_sizes(SegmentConfig(lesion="SE"))
    assert (sizes.patch_size, sizes.global_size, sizes.depths) == (
        256,
        640,
        {"global": 4, "local": 6},
    )
    cfg = SegmentConfig(lesion="SE", patch_size=80, local_global=LocalGlobalConfig(local_depth=5))
    with pytest.raises(Exception, match="multiple of 2\\*\\*5"):
        resolve_sizes(cfg)
    single = phase_config(SegmentConfig(), "global", validate=True)
    assert (single.learning_rate, single.lr_schedule, single.optimizer) == (2e-4, "poly", "adam")
    chosen = SegmentConfig(train=TrainConfig(learning_rate=5e-4, epochs=7))
    single = phase_config(chosen, "local", validate=True)
    assert (single.learning_rate, single.lr_schedule, single.epochs) == (5e-4, "constant", 7)
    fusion = phase_config(SegmentConfig(), "fusion", validate=True)
    joint = phase_config(SegmentConfig(), "joint", validate=False)
    assert (fusion.epochs, fusion.learning_rate, fusion.monitor) == (10, 2e-4, "val_aupr")
    assert (joint.epochs, joint.learning_rate, joint.monitor) == (60, 1e-4, "loss")


def test_an_encoder_directory_that_is_not_a_run_is_refused(tmp_path):
    """A folder without a stage-1 run's rmib.json is named in the error, never ignored."""
    from rmib import training
    from rmib.errors import RmibError

    cfg = SegmentConfig(lesion="EX", model="local-global", encoder=str(tmp_path))
    with pytest.raises(RmibError, match="stage-1 encoder"):
        train(cfg, [], [], training.RunDirectory(tmp_path / "run"))


@pytest.mark.parametrize("lesion", ["ex", "he", "ma", "se"])
def test_recipes_load(lesion):
    cfg = load_config(SegmentConfig, SEGMENT_DIR / f"idrid_{lesion}_local_global.toml")
    assert cfg.model == "local-global" and cfg.lesion == lesion.upper()
    assert cfg.local_global.phases == ["global", "local", "fusion", "joint"]
    assert (cfg.train.learning_rate, cfg.train.lr_schedule, cfg.patch_size) == (2e-4, "poly", 256)
    assert len(cfg.val_names) == 27 and resolve_sizes(cfg).depths == default_depths(cfg.lesion)


def test_ablation_recipe_loads_with_phase_overrides():
    path = SEGMENT_DIR / "idrid_local_global_ablation.toml"
    for phases in (["global"], ["local"], ["global", "local", "fusion", "joint"]):
        cfg = load_config(SegmentConfig, path, {"lesion": "MA", "local_global.phases": phases})
        assert cfg.local_global.phases == phases and cfg.lesion == "MA"


# ------------------------------------------------------------------ the four phases, end to end


@pytest.mark.integration  # a whole training run, then prediction: in make test, not make quick
def test_four_phases_end_to_end_then_resume(tmp_path, eager):
    from rmib import io, training
    from rmib.data.readers import read_dataset
    from rmib.data.synthetic import write_dataset
    from rmib.tasks import load_segmenter

    root = write_dataset(tmp_path / "idrid", "idrid", count=6, size=128, seed=0)
    records = {r.name: r for r in read_dataset(root).records if "MA" in r.masks}
    train_records = [records[n] for n in ("IDRiD_01", "IDRiD_02", "IDRiD_04")]
    val_records = [records[n] for n in ("IDRiD_06",)]  # 4 MA pixels
    cfg = SegmentConfig(
        lesion="MA",
        model="local-global",
        patch_size=32,
        predict_batch=32,
        augment="none",  # traced augmentation is slow to build; tested above on its own
        train=TrainConfig(
            epochs=1,
            batch_size=2,
            steps_per_epoch=1,
            learning_rate=1e-3,
            monitor="val_aupr",
            monitor_mode="max",
            precision="float32",
            tensorboard=False,
        ),
        local_global=LocalGlobalConfig(
            global_size=64, base_filters=4, global_depth=2, local_depth=2, epochs_per_phase=1
        ),
    )
    run = training.RunDirectory(tmp_path / "run")
    result = train(cfg, train_records, val_records, run)
    assert 0.0 < result["aupr"] <= 1.0
    for phase in PHASES:
        rows = run.read_history(phase)
        assert [row["epoch"] for row in rows] == [1] and "val_aupr" in rows[0], phase
    assert "global_loss" in run.read_history("joint")[0]
    assert run.model_path.is_file()

    for source in (run.path, run.model_path):
        metadata = training.read_run_metadata(source)
        assert metadata["task"] == "segment" and metadata["model"] == "local-global"
        assert metadata["network"] == "fused" and metadata["lesion"] == "MA"
        assert (metadata["global_size"], metadata["patch_size"], metadata["base_filters"]) == (
            64,
            32,
            4,
        )
        assert metadata["depths"] == {"global": 2, "local": 2}
        assert metadata["preprocessing"]["method"] == "clahe"
        assert metadata["preprocessing"]["centre_crop"] is False  # 128-px photographs
    photo = io.read_image(records["IDRiD_06"].image)
    segmenter = load_segmenter(run.path)
    assert isinstance(segmenter, LocalGlobalSegmenter)
    prob = segmenter.predict(photo)
    assert prob.shape == photo.shape[:2] and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0 and prob.max() > 0.0
    np.testing.assert_array_equal(load_segmenter(run.model_path).predict(photo), prob)

    # Interrupted in phase 4: resuming skips the finished phases and trains only "joint".
    fusion_history = run.history_path("fusion").read_text()
    for path in (
        run.history_path("joint"),
        run.checkpoint_path("last", "joint"),
        run.checkpoint_path("best", "joint"),
        run.state_path("joint"),
        run.model_path,
    ):
        path.unlink()
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg, train_records, val_records, run)
    again = train(dataclasses.replace(cfg), train_records, val_records, run, resume=True)
    assert run.history_path("fusion").read_text() == fusion_history
    assert [row["epoch"] for row in run.read_history("joint")] == [1]
    assert run.model_path.is_file() and 0.0 < again["aupr"] <= 1.0
