"""Backbones: keras.applications names and weights, CBAM placement, taps, weight loading."""

import threading
import types

import h5py
import keras
import numpy as np
import pytest

from rmib.errors import RmibError
from rmib.models import BACKBONES, CBAM, backbone_name, build_backbone
from rmib.models import backbones as backbones_module

from .helpers import weights_by_path

pytestmark = pytest.mark.timeout(300)

APPLICATIONS = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50}
IMAGENET_FILES = {
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


@pytest.fixture(scope="module")
def applications():
    """keras.applications models (random weights), as the ImageNet files are laid out."""
    return {
        name: build(weights=None, include_top=False, input_shape=(None, None, 3))
        for name, build in APPLICATIONS.items()
    }


def write_imagenet_style_h5(model, path):
    """Write weights the way the keras.applications ImageNet .h5 files store them."""
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = file.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, weight in zip(names, layer.weights, strict=True):
                group.create_dataset(name, data=np.array(weight))
    return path


def _perturb(model, seed):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(np.array(weight) + rng.normal(0, 0.01, weight.shape).astype("float32"))


def _weighted_layers(model):
    return {
        layer.name: [tuple(w.shape) for w in layer.weights]
        for layer in model.layers
        if layer.weights
    }


@pytest.mark.parametrize("name", BACKBONES)
def test_plain_backbone_has_keras_applications_layers(name, applications):
    ours = _weighted_layers(build_backbone(name))
    theirs = _weighted_layers(applications[name])
    assert ours == theirs
    # Weight order inside each layer matters for name-based loading too.
    mine = build_backbone(name)
    for layer in applications[name].layers:
        if layer.weights:
            assert [w.name for w in mine.get_layer(layer.name).weights] == [
                w.name for w in layer.weights
            ]


@pytest.mark.parametrize("name", BACKBONES)
def test_imagenet_style_file_loads_by_name_and_reproduces_keras_applications(
    name, applications, tmp_path
):
    reference = applications[name]
    _perturb(reference, seed=0)  # non-trivial BN statistics and biases
    path = write_imagenet_style_h5(reference, tmp_path / IMAGENET_FILES[name])
    # The file is in the real format: keras' own loader takes it.
    check = APPLICATIONS[name](weights=None, include_top=False, input_shape=(None, None, 3))
    check.load_weights(path)
    for a, b in zip(check.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))

    ours = build_backbone(name, weights=str(path))
    for layer in [layer for layer in reference.layers if layer.weights]:
        for a, b in zip(ours.get_layer(layer.name).weights, layer.weights, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    # Same network: the built-in preprocessing equals keras.applications' preprocess_input.
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    preprocess = keras.applications.imagenet_utils.preprocess_input
    expected = np.array(reference(preprocess(x.copy(), mode="caffe"), training=False))
    got = np.array(ours(x, training=False)["P5"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_cbam_backbone_loads_plain_file_and_keeps_cbam_init(applications, tmp_path):
    path = write_imagenet_style_h5(applications["vgg16"], tmp_path / "vgg.h5")
    keras.utils.set_random_seed(7)
    model = build_backbone("vgg16", cbam=True, weights=path)
    keras.utils.set_random_seed(7)
    fresh = build_backbone("vgg16", cbam=True)
    for layer in model.layers:
        expected = fresh.get_layer(layer.name).weights
        if isinstance(layer, CBAM):
            source = expected  # untouched: same seed, same initialisation
        else:
            source = applications["vgg16"].get_layer(layer.name).weights if layer.weights else []
        for a, b in zip(layer.weights, source, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("name", BACKBONES)
def test_weights_h5_round_trip_is_exact(name, tmp_path):
    model = build_backbone(name, cbam=True)
    _perturb(model, seed=2)
    path = tmp_path / f"{name}.weights.h5"
    model.save_weights(path)
    loaded = build_backbone(name, cbam=True, weights=path)
    saved = weights_by_path(model)
    got = weights_by_path(loaded)
    assert saved.keys() == got.keys()
    for key in saved:
        np.testing.assert_array_equal(got[key], saved[key])


def test_cbam_sits_where_the_paper_puts_it():
    vgg = build_backbone("vgg16", cbam=True)
    assert vgg.name == "vgg16_cbam"
    assert sum(isinstance(layer, CBAM) for layer in vgg.layers) == 5
    for block, last in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]:
        cbam = vgg.get_layer(f"block{block}_cbam")
        assert cbam.input is vgg.get_layer(f"block{block}_conv{last}").output
        assert vgg.get_layer(f"block{block}_pool").input is cbam.output
        if block < 5:
            assert vgg.output[f"P{block - 1}"] is cbam.output
    assert vgg.output["P4"] is vgg.get_layer("block5_cbam").output
    assert vgg.output["P5"] is vgg.get_layer("block5_pool").output

    resnet = build_backbone("resnet50", cbam=True)
    cbams = [layer for layer in resnet.layers if isinstance(layer, CBAM)]
    assert len(cbams) == 3 + 4 + 6 + 3
    for stage, blocks in [(2, 3), (3, 4), (4, 6), (5, 3)]:
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            cbam = resnet.get_layer(f"{prefix}_cbam")
            assert cbam.input is resnet.get_layer(f"{prefix}_3_bn").output
            assert any(t is cbam.output for t in resnet.get_layer(f"{prefix}_add").input)
    # CBAM adds 2.53 M parameters to ResNet50 (Woo et al., Table 3: 28.09 M vs 25.56 M).
    plain = build_backbone("resnet50")
    assert resnet.count_params() - plain.count_params() == pytest.approx(2.53e6, rel=2e-3)
    assert plain.count_params() == 23_587_712  # keras.applications ResNet50, no top


@pytest.mark.parametrize(
    "name, taps",
    [
        ("vgg16", {"P0": 64, "P1": 128, "P2": 256, "P3": 512, "P4": 512, "P5": 512}),
        ("resnet50", {"P1": 64, "P2": 256, "P3": 512, "P4": 1024, "P5": 2048}),
    ],
)
def test_taps_are_at_stride_two_to_the_k(name, taps):
    model = build_backbone(name)
    outputs = model(np.zeros((1, 64, 96, 3), "float32"))
    assert sorted(outputs) == sorted(taps)
    for key, channels in taps.items():
        stride = 2 ** int(key[1:])
        assert tuple(outputs[key].shape) == (1, 64 // stride, 96 // stride, channels)
    assert backbone_name(model) == name


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(RmibError, match="resnet50, vgg16") as info:
        build_backbone("inception")
    assert "inception" in str(info.value)


def test_imagenet_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones_module, "_keras_cache_dirs", lambda: [tmp_path / "models"])
    monkeypatch.setattr(backbones_module, "_online", lambda host, timeout=2.0: False)
    with pytest.raises(RmibError, match="offline") as info:
        build_backbone("vgg16", weights="imagenet")
    assert "--weights PATH" in str(info.value) and "--weights none" in str(info.value)
    assert IMAGENET_FILES["vgg16"] in str(info.value)


def test_imagenet_is_taken_from_the_keras_cache(applications, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    write_imagenet_style_h5(applications["vgg16"], tmp_path / "models" / IMAGENET_FILES["vgg16"])
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(backbones_module, "_online", lambda host, timeout=2.0: pytest.fail())
    model = build_backbone("vgg16", weights="imagenet")
    np.testing.assert_array_equal(
        np.array(model.get_layer("block3_conv2").kernel),
        np.array(applications["vgg16"].get_layer("block3_conv2").kernel),
    )


def test_online_check_does_not_wait_for_a_connection_attempt_that_hangs(monkeypatch):
    # Name resolution ignores the socket timeout: a connection attempt can hang far longer.
    # The check must answer "offline" while such an attempt is still hanging, and pass
    # its timeout on. No clock: the fake attempt hangs until the test releases it.
    entered, release, left, seen = threading.Event(), threading.Event(), threading.Event(), []

    def create_connection(address, timeout=None):
        seen.append((address, timeout))
        entered.set()
        release.wait(60)
        left.set()
        raise OSError("unreachable")

    fake = types.SimpleNamespace(create_connection=create_connection)
    monkeypatch.setattr(backbones_module, "socket", fake)
    try:
        assert not backbones_module._online("host.invalid", timeout=0.05)
        assert entered.is_set() and not left.is_set()  # answered while the attempt hung
        assert seen == [(("host.invalid", 443), 0.05)]
    finally:
        release.set()


def test_bad_weights_paths_name_the_file(applications, tmp_path):
    with pytest.raises(RmibError, match="missing.h5"):
        build_backbone("vgg16", weights=tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(RmibError, match="notes.h5"):
        build_backbone("vgg16", weights=text)
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(RmibError, match="weights.txt"):
        build_backbone("vgg16", weights=other)
    # The ResNet50 file given to VGG16: refused, with the file named.
    resnet_file = write_imagenet_style_h5(applications["resnet50"], tmp_path / "resnet.h5")
    with pytest.raises(RmibError, match="resnet.h5.*block1_conv1"):
        build_backbone("vgg16", weights=resnet_file)
    # A .weights.h5 of another architecture.
    vgg_weights = tmp_path / "vgg.weights.h5"
    build_backbone("vgg16").save_weights(vgg_weights)
    with pytest.raises(RmibError, match="vgg.weights.h5"):
        build_backbone("resnet50", weights=vgg_weights)
    assert build_backbone("vgg16", weights="none").name == "vgg16"


@pytest.mark.parametrize("cbam", [False, True])
def test_vgg16_from_scratch_keeps_its_signal(cbam):
    """Untrained VGG16 (weights none) taps neither vanish nor explode (He init, CBAM gates).

    With keras.applications' Glorot initialisation and standard CBAM initialisation the
    P4 tap of VGG16-CBAM had a std of ~1e-3 and a frozen encoder carried no signal.
    """
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    taps = build_backbone("vgg16", cbam=cbam)(x)
    for name, value in taps.items():
        assert 0.1 < float(np.std(np.array(value))) < 10.0, name


# --------------------------------------------------------------------------- output stride


@pytest.mark.parametrize(
    "output_stride, strides",
    [
        (32, {"P1": 2, "P2": 4, "P3": 8, "P4": 16, "P5": 32}),
        (16, {"P1": 2, "P2": 4, "P3": 8, "P4": 16, "P5": 16}),
        (8, {"P1": 2, "P2": 4, "P3": 8, "P4": 8, "P5": 8}),
    ],
)
def test_dilated_resnet50_taps_are_at_their_real_strides(output_stride, strides):
    model = build_backbone("resnet50", output_stride=output_stride)
    assert backbones_module.tap_strides(model) == strides
    assert backbones_module.output_stride(model) == output_stride
    # Symbolic shapes of a full-size IDRiD input (no forward pass).
    symbolic = model(keras.Input((960, 1440, 3)))
    for key, stride in strides.items():
        assert tuple(symbolic[key].shape[1:3]) == (960 // stride, 1440 // stride), key
    # A tiny forward pass computes.
    outputs = model(np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32"))
    assert tuple(outputs["P5"].shape) == (1, 64 // output_stride, 96 // output_stride, 2048)
    assert np.isfinite(np.array(outputs["P5"])).all()


def test_dilation_rates_are_deeplab_and_pspnet_ones():
    def rates(model, stage):
        return {
            layer.name: (layer.strides[0], layer.dilation_rate[0])
            for layer in model.layers
            if layer.name.startswith(f"conv{stage}_block")
            and layer.name.endswith(("_1_conv", "_2_conv"))
        }

    os8 = build_backbone("resnet50", output_stride=8)
    os16 = build_backbone("resnet50", output_stride=16)
    # OS 8: conv4 stride 1, dilation 2; conv5 stride 1, dilation 4 (3x3 convolutions only).
    assert os8.get_layer("conv4_block1_1_conv").strides == (1, 1)
    assert os8.get_layer("conv4_block1_0_conv").strides == (1, 1)
    assert {v for k, v in rates(os8, 4).items() if k.endswith("_2_conv")} == {(1, 2)}
    assert {v for k, v in rates(os8, 5).items() if k.endswith("_2_conv")} == {(1, 4)}
    assert {v for k, v in rates(os8, 3).items() if k.endswith("_2_conv")} == {(1, 1)}
    # OS 16: conv4 as in ResNet50, conv5 stride 1, dilation 2.
    assert os16.get_layer("conv4_block1_1_conv").strides == (2, 2)
    assert {v for k, v in rates(os16, 4).items() if k.endswith("_2_conv")} == {(1, 1)}
    assert {v for k, v in rates(os16, 5).items() if k.endswith("_2_conv")} == {(1, 2)}


@pytest.mark.parametrize("cbam", [False, True])
def test_a_stride_8_backbone_takes_the_weights_of_a_stride_32_one(cbam, tmp_path):
    plain = build_backbone("resnet50", cbam=cbam)
    _perturb(plain, seed=5)
    dilated = build_backbone("resnet50", cbam=cbam, output_stride=8)
    # Same layers, same weight shapes: dilation changes no weight.
    assert _weighted_layers(dilated) == _weighted_layers(plain)
    dilated.set_weights(plain.get_weights())
    for a, b in zip(dilated.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # A .weights.h5 file saved at stride 32 loads at stride 8 through `weights=PATH`.
    path = tmp_path / "plain.weights.h5"
    plain.save_weights(path)
    loaded = build_backbone("resnet50", cbam=cbam, output_stride=8, weights=str(path))
    for a, b in zip(loaded.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # rebuild_at_output_stride copies by layer name and keeps CBAM's init.
    rebuilt = backbones_module.rebuild_at_output_stride(plain, 8)
    assert backbones_module.output_stride(rebuilt) == 8
    assert rebuilt.name == plain.name
    for a, b in zip(rebuilt.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert backbones_module.rebuild_at_output_stride(plain, 32) is plain


def test_imagenet_style_file_loads_into_a_stride_8_backbone(applications, tmp_path):
    path = write_imagenet_style_h5(applications["resnet50"], tmp_path / "resnet50.h5")
    model = build_backbone("resnet50", output_stride=8, weights=str(path))
    reference = applications["resnet50"]
    for name in ("conv1_conv", "conv4_block3_2_conv", "conv5_block3_3_bn"):
        for a, b in zip(
            model.get_layer(name).weights, reference.get_layer(name).weights, strict=True
        ):
            np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize(
    "name, stride", [("vgg16", 8), ("vgg16", 16), ("resnet50", 4), ("resnet50", 64)]
)
def test_unsupported_output_strides_are_named(name, stride):
    expected = "32" if name == "vgg16" else "8, 16, 32"
    with pytest.raises(
        RmibError,
        match=f"{name} cannot be built at output_stride {stride}; expected one of {expected}",
    ):
        build_backbone(name, output_stride=stride)


def test_cbam_init_reaches_every_module():
    model = build_backbone("vgg16", cbam=True, cbam_init="woo")
    modules = [layer for layer in model.layers if isinstance(layer, CBAM)]
    assert len(modules) == 5 and {m.init for m in modules} == {"woo"}
    assert all(np.abs(np.array(m.spatial_conv.kernel)).max() > 0 for m in modules)
