"""The local-global U-Net on a stage-1 encoder (`rmib segment --model local-global --encoder RUN`).

The stage-1 classifier's backbone becomes GlobalNet's and LocalNet's encoder,
bit for bit and frozen through all four phases; the U-Net decoder climbs its skip taps.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from rmib import training
from rmib.errors import RmibError
from rmib.methods.local_global.config import PHASES, encoder_setup, resolve_sizes
from rmib.methods.local_global.model import (
    backbone_encoders,
    build_global_net,
    build_local_global,
    build_local_net,
    copy_backbone,
    copy_matching_weights,
)
from rmib.methods.local_global.train import _compile_arguments, _phase_model_builder
from rmib.methods.segment_config import LocalGlobalConfig, SegmentConfig
from rmib.models.backbones import build_backbone
from tests.conftest import invoke

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions"),
]
VGG16_TAP_CHANNELS = [64, 128, 256, 512, 512, 512]  # P0 .. P5


@pytest.fixture
def eager():
    # Tracing train steps of two VGG16-based U-Nets costs more than a few eager steps.
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def stage1_backbone(run):
    return training.load_model(run).get_layer("backbone")


def assert_stage1_weights(encoder, stage1):
    """Every weight of `encoder` equals the stage-1 backbone's layer of the same name."""
    assert encoder.weights
    for layer in encoder.layers:
        source = stage1.get_layer(layer.name).weights
        assert len(layer.weights) == len(source), layer.name
        for got, want in zip(layer.weights, source, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=got.path)


def tiny_cfg(encoder, **local_global):
    return SegmentConfig(
        lesion="EX",
        model="local-global",
        encoder=str(encoder),
        patch_size=32,
        local_global=LocalGlobalConfig(global_size=64, base_filters=4, **local_global),
    )


def test_every_phase_builds_on_the_frozen_stage1_encoder(pretrain_run, eager):
    # EX: the paper's GlobalNet depth 6 is capped at the backbone's deepest tap P5.
    assert resolve_sizes(tiny_cfg(pretrain_run)).depths == {"global": 5, "local": 3}
    cfg = tiny_cfg(pretrain_run, global_depth=1, local_depth=2)  # small cuts: fast
    setup = encoder_setup(cfg)
    assert setup.nets == ("global", "local") and setup.frozen
    assert setup.info["encoder_weights"] == "stage-1"
    sizes = resolve_sizes(cfg)
    stage1 = stage1_backbone(pretrain_run)

    single = _phase_model_builder("local", sizes, 1e-4, {}, setup)()
    fused = _phase_model_builder("fusion", sizes, 1e-4, {"local": single}, setup)()
    for model, nets in ((single, {"local"}), (fused, {"global", "local"})):
        encoders = backbone_encoders(model)
        assert set(encoders) == nets
        for encoder in encoders.values():
            assert_stage1_weights(encoder, stage1)
            assert encoder.trainable_weights == []
    global_encoder, local_encoder = backbone_encoders(fused).values()
    # Cut after P{depth}: VGG16's tap P{depth} is block {depth + 1} before its pooling.
    local_layers = {layer.name for layer in local_encoder.layers}
    assert {"block3_conv3", "block3_cbam"} <= local_layers
    assert not local_layers & {"block3_pool", "block4_conv1"}
    assert max(layer.name for layer in global_encoder.layers if "block" in layer.name) == (
        "block2_conv2"
    )
    assert not set(map(id, global_encoder.weights)) & set(map(id, local_encoder.weights))
    # The decoder concatenates the tap of each level's stride.
    trunk = fused.get_layer("local_trunk")
    for level in range(2):
        concat = trunk.get_layer(f"local_trunk_concat{level}")
        assert concat.input[0].shape[-1] == VGG16_TAP_CHANNELS[level]

    # Phase 4 trains the decoders and the fusion head; the encoders stay stage-1's.
    joint = _phase_model_builder("joint", sizes, 1e-4, {"fusion": fused}, setup)()
    encoder_ids = {id(w) for e in backbone_encoders(joint).values() for w in e.weights}
    assert encoder_ids and not any(id(w) in encoder_ids for w in joint.trainable_weights)
    rng = np.random.default_rng(0)
    x = {
        "global_image": rng.uniform(0, 255, (2, 64, 64, 3)).astype("f4"),
        "patch": rng.uniform(0, 255, (2, 32, 32, 3)).astype("f4"),
        "box": np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], "f4"),
    }
    y = {"global": (x["global_image"][..., :1] > 200).astype("f4")}
    y["local"] = (x["patch"][..., :1] > 200).astype("f4")
    arguments = _compile_arguments("joint", cfg)
    joint.compile(optimizer="adam", loss=arguments["loss"], **arguments["compile_kwargs"])
    before = {id(w): np.array(w) for w in joint.trainable_weights}
    joint.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert any(not np.array_equal(np.array(w), before[id(w)]) for w in joint.trainable_weights)
    for encoder in backbone_encoders(joint).values():
        assert_stage1_weights(encoder, stage1)


def test_backbone_by_name_for_one_net_and_the_refusals(tmp_path):
    # SegmentConfig's default encoder "vgg16" alone leaves the paper's plain U-Nets.
    assert encoder_setup(SegmentConfig(model="local-global")) is None
    cfg = tiny_cfg("resnet50", encoder_nets=["local"], global_depth=1, local_depth=2)
    setup = encoder_setup(cfg)
    assert setup.nets == ("local",) and not setup.frozen  # built from scratch: trained
    assert setup.info["encoder_weights"] == "none"
    fused = _phase_model_builder("joint", resolve_sizes(cfg), 0.0, {}, setup)()
    encoders = backbone_encoders(fused)
    assert set(encoders) == {"local"}
    assert encoders["local"].trainable_weights  # all but the batch-norm statistics
    frozen = {w.name for w in encoders["local"].non_trainable_weights}
    assert frozen == {"moving_mean", "moving_variance"}
    trunk = fused.get_layer("local_trunk")
    names = {layer.name for layer in trunk.layers}
    # ResNet50 cut at P2 (conv2_block3_out, 256 channels, the bottleneck), its
    # skip P1 (conv1_relu, 64 channels); no tap at full resolution.
    assert trunk.get_layer("local_trunk_up1").input.shape[-1] == 256
    assert trunk.get_layer("local_trunk_concat1").input[0].shape[-1] == 64
    assert "local_trunk_concat0" not in names
    x = {
        "global_image": np.zeros((1, 64, 64, 3), "f4"),
        "patch": np.zeros((3, 32, 32, 3), "f4"),
        "box": np.tile(np.array([[0.0, 0.0, 0.5, 0.5]], "f4"), (3, 1)),
    }
    out = fused(x)
    assert tuple(out["global"].shape) == (1, 64, 64, 1)
    assert tuple(out["local"].shape) == (3, 32, 32, 1)

    with pytest.raises(RmibError, match="at most 5 pooling levels"):
        resolve_sizes(tiny_cfg("vgg16", encoder_nets=["global"], global_depth=6))
    with pytest.raises(RmibError, match="freeze_encoder"):
        encoder_setup(SegmentConfig(model="local-global", fine_tune_after=2))
    with pytest.raises(RmibError, match="stage-1 encoder"):
        encoder_setup(tiny_cfg(tmp_path))  # a directory that is no run
    with pytest.raises(RmibError, match="valid backbones"):
        encoder_setup(tiny_cfg("vgg19", encoder_nets=["global"]))


def test_two_encoders_with_the_same_layer_names_keep_their_own_weights():
    # Both nets' encoders have a "block1_conv1"; trained GlobalNet and LocalNet
    # must each land in their own trunk of the fused model, not in both.
    first, second = build_backbone("vgg16"), build_backbone("vgg16")
    global_net = build_global_net(1, 4, 8, encoder=copy_backbone(first, 1))
    local_net = build_local_net(2, 4, 8, encoder=copy_backbone(second, 2))
    fused = build_local_global(
        1,
        2,
        4,
        8,
        global_size=32,
        global_encoder=copy_backbone(second, 1),
        local_encoder=copy_backbone(first, 2),
    )
    assert copy_matching_weights(global_net, fused) == len(global_net.weights)
    # All but LocalNet's own 1x1 output (kernel, bias): the fusion head replaces it.
    assert copy_matching_weights(local_net, fused) == len(local_net.weights) - 2
    encoders = backbone_encoders(fused)
    for net, source in (("global", first), ("local", second)):
        got = encoders[net].get_layer("block1_conv1").kernel
        want = source.get_layer("block1_conv1").kernel
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=net)
    assert not np.array_equal(
        np.asarray(first.get_layer("block1_conv1").kernel),
        np.asarray(second.get_layer("block1_conv1").kernel),
    )


@pytest.mark.parametrize("with_encoder", [False, True])
def test_the_fused_models_trunks_are_the_single_nets_trunks(with_encoder):
    # One trunk builder (`build_unet_trunk`) for both: the same layers, names, widths and
    # nesting, so that a trained single net's trunk is the fused model's, weight for weight.
    backbone = build_backbone("vgg16") if with_encoder else None

    def encoder(depth):
        return copy_backbone(backbone, depth) if with_encoder else None

    fused = build_local_global(
        2, 1, 4, 8, global_size=32, global_encoder=encoder(2), local_encoder=encoder(1)
    )
    for net, depth in (("global", 2), ("local", 1)):
        build = build_global_net if net == "global" else build_local_net
        single = build(depth, 4, 8, encoder=encoder(depth)).get_layer(f"{net}_trunk")
        trunk = fused.get_layer(f"{net}_trunk")
        assert trunk.get_config() == single.get_config()
        assert (f"{net}_encoder" in [layer.name for layer in trunk.layers]) == with_encoder


@pytest.mark.slow  # ~65 s; the four phases through the CLI are in make test via test_local_global
def test_four_phases_predict_evaluate_and_resume_through_the_cli(tmp_path, pretrain_run, eager):
    from rmib.data.synthetic import write_dataset
    from rmib.predict import read_probability_png

    data = write_dataset(tmp_path / "idrid", "idrid", 5, 96, 0)
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.toml"  # shallow cuts of the stage-1 VGG16: a fast test
    recipe.write_text("[local_global]\nglobal_depth = 2\nlocal_depth = 2\n")
    command = [
        "segment", "--config", recipe, "--model", "local-global", "--lesion", "EX", "--data", data,
        "--encoder", pretrain_run, "--global-size", 64, "--patch-size", 32,
        "--base-filters", 4, "--epochs-per-phase", 1, "--batch-size", 4,
        "--patches-per-epoch", 4, "--val-fraction", 0, "--precision", "float32",
        "--out", out, "--seed", 0,
    ]  # fmt: skip
    result = invoke(command)
    assert result.exit_code == 0, result.output
    run = training.RunDirectory(out)
    for phase in PHASES:
        assert [row["epoch"] for row in run.read_history(phase)] == [1], phase
    metadata = training.read_run_metadata(out)
    assert metadata["network"] == "fused" and metadata["depths"] == {"global": 2, "local": 2}
    assert metadata["encoder"] == str(pretrain_run) and metadata["encoder_frozen"] is True
    assert metadata["encoder_nets"] == ["global", "local"]
    assert (metadata["backbone"], metadata["cbam"]) == ("vgg16", True)
    stage1 = stage1_backbone(pretrain_run)
    model = training.load_model(out)
    for encoder in backbone_encoders(model).values():  # after all four phases
        assert_stage1_weights(encoder, stage1)
        assert encoder.trainable_weights == []

    photo = data / "A. Segmentation/1. Original Images/a. Training Set/IDRiD_03.jpg"
    result = invoke(["predict", out, photo, "--out", tmp_path / "predicted"])
    assert result.exit_code == 0, result.output
    written = {p.name for p in (tmp_path / "predicted").iterdir()}
    assert {f"IDRiD_03_{kind}.png" for kind in ("prob", "mask", "overlay")} <= written
    prob = read_probability_png(tmp_path / "predicted" / "IDRiD_03_prob.png")
    assert prob.shape == (96, 96) and 0.0 <= prob.min() and prob.max() <= 1.0
    result = invoke(
        ["evaluate", out, "--data", data, "--names", "IDRiD_03", "--out", tmp_path / "evaluated"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert metrics["images"] == 1 and 0.0 <= metrics["aupr"] <= 1.0

    # Interrupted in phase 4: --resume trains "joint" again from the fusion phase's model.
    for path in (
        run.history_path("joint"),
        run.checkpoint_path("last", "joint"),
        run.checkpoint_path("best", "joint"),
        run.state_path("joint"),
        run.model_path,
    ):
        path.unlink()
    result = invoke([*command, "--resume"])
    assert result.exit_code == 0, result.output
    assert [row["epoch"] for row in run.read_history("joint")] == [1]
    for encoder in backbone_encoders(training.load_model(out)).values():
        assert_stage1_weights(encoder, stage1)
