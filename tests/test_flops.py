"""benchmarks/flops.py against hand-counted FLOPs, and a smoke test of the harness."""

from __future__ import annotations

import keras
import pytest

from benchmarks import run
from benchmarks.flops import TRAIN_STEP_FACTOR, layer_flops, model_flops
from rmib.models import CBAM

pytestmark = pytest.mark.timeout(240)


def _single_layer_flops(layer, input_shape):
    inputs = keras.Input(input_shape)
    return model_flops(keras.Model(inputs, layer(inputs)), input_shape)


def test_conv_same_padding_hand_count():
    layer = keras.layers.Conv2D(8, 3, padding="same")
    assert _single_layer_flops(layer, (10, 10, 4)) == 2 * 10 * 10 * 8 * 3 * 3 * 4


def test_conv_valid_stride_two_hand_count():
    # 11x11 valid, stride 2 -> 5x5 outputs.
    layer = keras.layers.Conv2D(16, 3, strides=2, padding="valid")
    assert _single_layer_flops(layer, (11, 11, 3)) == 2 * 5 * 5 * 16 * 9 * 3


def test_grouped_conv_counts_input_channels_per_group():
    layer = keras.layers.Conv2D(8, 3, padding="same", groups=2)
    assert _single_layer_flops(layer, (10, 10, 4)) == 2 * 10 * 10 * 8 * 9 * 2


def test_dense_on_vectors_and_sequences():
    assert _single_layer_flops(keras.layers.Dense(3), (4,)) == 2 * 4 * 3
    # A Dense on (2, 4) acts at each of the 2 positions.
    assert _single_layer_flops(keras.layers.Dense(3), (2, 4)) == 2 * 2 * 4 * 3


def test_conv_transpose_scatters_every_input_pixel():
    layer = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same")
    # 4x4x2 input, each pixel x 3x3 kernel x 5 output channels.
    assert _single_layer_flops(layer, (4, 4, 2)) == 2 * 4 * 4 * 2 * 9 * 5


def test_depthwise_conv_hand_count():
    layer = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)
    assert _single_layer_flops(layer, (6, 6, 3)) == 2 * 6 * 6 * (3 * 2) * 9


def test_separable_conv_is_depthwise_plus_pointwise():
    layer = keras.layers.SeparableConv2D(8, 3, padding="same")
    depthwise = 6 * 6 * 4 * 9
    pointwise = 6 * 6 * 4 * 8
    assert _single_layer_flops(layer, (6, 6, 4)) == 2 * (depthwise + pointwise)


def test_uncounted_layers_cost_nothing():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Activation("relu")(x)
    assert model_flops(keras.Model(inputs, x), (8, 8, 3)) == 0


def test_nested_model_is_walked():
    inner_in = keras.Input((None, None, 3))
    inner = keras.Model(
        inner_in, keras.layers.Conv2D(4, 3, padding="same")(inner_in), name="backbone"
    )
    inputs = keras.Input((6, 6, 3))
    x = inner(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    assert model_flops(model, (6, 6, 3)) == 2 * (6 * 6 * 4 * 9 * 3) + 2 * 4 * 2


def test_cbam_shared_mlp_counts_both_descriptors():
    # C = 32, ratio 16 -> hidden 2; the MLP runs on the average and the maximum
    # descriptors (2 x (32*2 + 2*32)); the 7x7 spatial conv maps 2 -> 1 channel.
    inputs = keras.Input((8, 8, 32))
    model = keras.Model(inputs, CBAM(ratio=16, kernel_size=7)(inputs))
    mlp = 2 * (32 * 2 + 2 * 32)
    spatial = 8 * 8 * 1 * 49 * 2
    assert model_flops(model, (8, 8, 32)) == 2 * (mlp + spatial)
    names = [name for name, _ in layer_flops(model, (8, 8, 32))]
    assert sorted(names) == ["mlp_hidden", "mlp_output", "spatial_conv"]


def test_vgg16_matches_the_published_layer_table():
    # VGG16's 13 convs (Simonyan & Zisserman, config D), 3x3 'same', at 32 px.
    plan = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256)]
    plan += [(8, 256, 256)] * 2 + [(4, 256, 512)] + [(4, 512, 512)] * 2 + [(2, 512, 512)] * 3
    expected = sum(2 * side * side * c_out * 9 * c_in for side, c_in, c_out in plan)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    assert model_flops(model, (32, 32, 3)) == expected


def test_training_step_counts_three_forward_passes():
    assert TRAIN_STEP_FACTOR == 3


def test_markdown_keeps_other_sections(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.write_markdown(
        out, {"peak": "## Machine peak\n\nOLD-PEAK", "tiled_prediction": "## tiled\n\nT"}
    )
    sections = run.read_sections(out)
    sections.update({"peak": "## Machine peak\n\nNEW-PEAK"})
    run.write_markdown(out, sections)
    text = out.read_text()
    assert "NEW-PEAK" in text and "OLD-PEAK" not in text and "## tiled\n\nT" in text
    assert text.index("Machine peak") < text.index("## tiled")
    assert text.startswith("# rmib benchmarks")


def test_quick_pretrain_run_writes_tables(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    results = run.main(
        ["--quick", "--only", "pretrain_throughput", "--models", "vgg16", "--out", str(out)]
    )
    rows = results["pretrain_throughput"]["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("vgg16", "float32"),
        ("vgg16", "mixed_bfloat16"),
    ]
    assert all(r["images_per_second"] > 0 and r["gflops"] > 0 for r in rows)
    assert keras.mixed_precision.global_policy().name == "float32"
    text = out.read_text()
    assert "## pretrain_throughput" in text and "| rmib VGG16 | mixed_bfloat16 |" in text
    assert "QUICK" in text and "make bench" in text
    assert results["peak"]["peak"]["float32"] > 0


def test_tiled_child_counts_tiles_and_memory():
    job = {"mode": "tiled", "precision": "float32", "shape": [96, 128], "tile": 64, "quick": True}
    try:
        result = run.child_tiled(job)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Stride 64 - round(0.125 * 64) = 56: rows at 0, 32; columns at 0, 56, 64.
    assert 1 <= result["tiles"] <= 2 * 3
    assert result["seconds"] > 0
    assert result["peak_rss"] >= result["baseline_rss"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)  # every default benchmark at quick sizes, three TF processes included
def test_full_quick_run_end_to_end(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for heading in ("## Machine peak", "## pretrain_throughput", "## tiled_prediction"):
        assert heading in text
    assert "### Memory check" in text and "## multiworker_throughput" in text
