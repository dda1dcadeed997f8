import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rmib.errors import RmibError  # noqa: E402
from rmib.methods.grading.lesion_map import apply_lesion_map, predict_lesion_map  # noqa: E402
from rmib.methods.grading.nets import (  # noqa: E402
    build_grading_global_net,
    build_grading_local_net,
)
from tests.helpers import run_model_checks  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _shape(model, name):
    return tuple(model.get_layer(name).output.shape[1:])


def _check_bn_before_relu_and_dropout_after_fc(model):
    layers = {layer.name: layer for layer in model.layers}
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus
    for relu in relus:
        source = relu._inbound_nodes[0].parent_nodes[0].operation
        assert isinstance(source, keras.layers.BatchNormalization), relu.name
    for fc in ("fc1", "fc2"):
        assert isinstance(layers[f"{fc}_dropout"], keras.layers.Dropout)
        node = layers[f"{fc}_dropout"]._inbound_nodes[0]
        assert node.parent_nodes[0].operation is layers[f"{fc}_relu"]


def _fit_one_step(model, inputs, num_classes):
    labels = np.arange(len(inputs)) % num_classes
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(inputs, labels, batch_size=len(inputs), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [
        not np.array_equal(a, w.numpy())
        for a, w in zip(before, model.trainable_weights, strict=True)
    ]
    assert all(changed)


def test_local_net_table_one_shapes_at_64_px():
    model = build_grading_local_net(patch=64)
    assert model.name == "yang_local_net"
    assert model.input_shape == (None, 64, 64, 3)
    assert model.output_shape == (None, 4)
    expected = {
        "conv1": (64, 64, 64),
        "conv2": (64, 64, 128),
        "pool1": (32, 32, 128),
        "conv3": (32, 32, 128),
        "pool2": (16, 16, 128),
        "conv4": (16, 16, 256),
        "flatten": (16 * 16 * 256,),
        "fc1": (512,),
        "fc2": (1024,),
        "probs": (4,),
    }
    for name, shape in expected.items():
        assert _shape(model, name) == shape, name
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [64, 128, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.strides == (1, 1) for c in convs)
    assert all(c.padding == "same" for c in convs)
    # fc1 weights: 65536 x 512 (no bias: BN follows).
    assert model.get_layer("fc1").count_params() == 65536 * 512
    _check_bn_before_relu_and_dropout_after_fc(model)
    assert model.get_layer("fc1_dropout").rate == 0.5


def test_local_net_fits_one_step_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_grading_local_net(patch=16, num_classes=4, dropout=0.25)
    assert _shape(model, "flatten") == (4 * 4 * 256,)
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    _fit_one_step(model, x, 4)
    probs = run_model_checks(model, x, tmp_path, output_shape=(8, 4)).outputs
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_outputs_are_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        local = build_grading_local_net(patch=8)
        global_ = build_grading_global_net(image_size=16)
    finally:
        keras.config.set_dtype_policy(previous)
    assert local.get_layer("conv1").compute_dtype == "bfloat16"
    x = np.zeros((2, 8, 8, 3), np.float32)
    assert keras.ops.convert_to_numpy(local(x)).dtype == np.float32
    assert global_.output.dtype == "float32"


def test_global_net_table_two_shapes_at_256_px():
    model = build_grading_global_net(image_size=256, num_classes=4)
    assert model.name == "yang_global_net"
    assert model.output_shape == (None, 4)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 9
    # 'same' pooling: 256 halves to 1 after eight pools, and the ninth keeps 1x1.
    assert [p.output.shape[1] for p in pools] == [128, 64, 32, 16, 8, 4, 2, 1, 1]
    assert _shape(model, "conv1") == (256, 256, 32)
    assert _shape(model, "conv10") == (1, 1, 512)
    assert _shape(model, "flatten") == (512,)
    assert _shape(model, "fc1") == (1024,) and _shape(model, "fc2") == (1024,)
    _check_bn_before_relu_and_dropout_after_fc(model)


def test_global_net_five_grades_fits_one_step_at_32_px_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_grading_global_net(image_size=32, num_classes=5, dropout=0.5)
    assert model.output_shape == (None, 5)
    assert _shape(model, "flatten") == (512,)
    x = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    # Round trip before compiling: 6 M weights, without three times as many optimizer slots.
    probs = run_model_checks(model, x, tmp_path, output_shape=(5, 5)).outputs
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    _fit_one_step(model, x, 5)


def test_global_net_refuses_unknown_variant_and_bad_arguments():
    with pytest.raises(RmibError, match="'vgg19'.*yang.*vgg16.*resnet50"):
        build_grading_global_net(variant="vgg19")
    with pytest.raises(RmibError, match="weights"):
        build_grading_global_net(image_size=32, weights="imagenet")
    assert build_grading_global_net(image_size=8, weights="none").output_shape == (None, 4)
    with pytest.raises(ValueError, match="dropout"):
        build_grading_global_net(image_size=32, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        build_grading_local_net(patch=16, num_classes=1)


def test_global_net_vgg16_variant_at_64_px():
    model = build_grading_global_net(image_size=64, num_classes=4, variant="vgg16")
    assert model.output_shape == (None, 4)
    assert _shape(model, "gap") == (512,)
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, keras.Model)
    assert tuple(backbone.output["P5"].shape[1:]) == (2, 2, 512)  # 64 / 32
    x = np.random.default_rng(3).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_tiny_two_stage_pipeline():
    keras.utils.set_random_seed(0)
    local = build_grading_local_net(patch=16)
    global_ = build_grading_global_net(image_size=48)
    image = np.random.default_rng(4).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    found = predict_lesion_map(local, image, patch=16, overlap=8, batch_size=7)
    weights, labels, probs = found.weights, found.labels, found.probs
    assert labels.shape == probs.shape == (5, 5)  # offsets 0, 8, 16, 24, 32
    assert set(labels.ravel().tolist()) <= {0, 1, 2, 3}
    assert np.all(probs >= 0.25) and np.all(probs <= 1.0)
    assert weights.shape == (48, 48) and 0.25 <= weights.min() <= weights.max() <= 4.0
    weighted = apply_lesion_map(image, weights)
    assert weighted.max() <= 255.0
    grades = global_.predict(weighted[None], verbose=0)
    assert grades.shape == (1, 4)
