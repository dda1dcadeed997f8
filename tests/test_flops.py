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


def _resnet50_multiply_adds(side):
    """ResNet50 (keras.applications v1: the stride on each stage's first 1x1) by hand."""
    total = (side // 2) ** 2 * 64 * 7 * 7 * 3  # conv1 7x7/2
    side //= 4  # conv1's stride, then the 3x3/2 max pool
    channels = 64
    for stage, (filters, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        if stage:
            side //= 2
        for block in range(blocks):
            pixels = side * side
            if block == 0:
                total += pixels * 4 * filters * channels  # _0_conv, the 1x1 shortcut
            total += pixels * filters * channels  # _1_conv 1x1
            total += pixels * filters * filters * 9  # _2_conv 3x3
            total += pixels * 4 * filters * filters  # _3_conv 1x1
            channels = 4 * filters
    return total


def test_resnet50_matches_the_layer_plan_and_one_layer_by_hand():
    from rmib.models import build_backbone

    model = build_backbone("resnet50", weights=None)
    assert model_flops(model, (64, 64, 3)) == 2 * _resnet50_multiply_adds(64)
    # One layer by hand at 224 px: conv2_block1_2_conv, 3x3, 64 -> 64 channels on a
    # 56 x 56 map: 56 * 56 * 64 * 64 * 9 = 115,605,504 multiply-adds, 231.2 MFLOP.
    flops = dict(layer_flops(model, (224, 224, 3)))
    assert flops["conv2_block1_2_conv"] == 2 * 115_605_504
    # The whole step at 224 px, batch 4: 3 x 2 x 3.855 G multiply-adds x 4 = 92.5 GFLOP
    # (the "33 % of peak" of issue #19's first table used the multiply-add count).
    assert _resnet50_multiply_adds(224) == 3_855_925_248
    assert sum(flops.values()) == 2 * _resnet50_multiply_adds(224)
    step = TRAIN_STEP_FACTOR * sum(flops.values()) * 4
    assert round(step / 1e9, 1) == 92.5


def test_pretrain_summary_against_hand_numbers():
    from benchmarks.pretrain_summary import summary_rows

    peak = {"conv": {"float32": 100.0, "bfloat16": 200.0}}

    def row(model, precision, seconds, gflops):
        return {"model": model, "precision": precision, "step_seconds": seconds, "gflops": gflops}

    rows = [
        row("resnet50", "float32", 1.0, 50.0),
        row("resnet50", "mixed_bfloat16", 0.625, 80.0),
        row("resnet50_cbam", "float32", 1.1, 45.0),
        row("resnet50_cbam", "mixed_bfloat16", 0.75, 66.0),
        row("keras_resnet50", "float32", 0.9, 55.0),
    ]
    plain, cbam, twin = summary_rows(rows, peak)
    # bf16 / fp32 = 1 / 0.625 = 1.6, 80 % of the peak ratio 2; 50 % and 40 % of the peaks.
    assert plain["speedup"] == pytest.approx(1.6)
    assert plain["speedup_of_peak_ratio"] == pytest.approx(80.0)
    assert (plain["float32_share"], plain["bfloat16_share"]) == pytest.approx((50.0, 40.0))
    assert plain["cbam_added_float32"] is None
    # CBAM: 1.1 / 1.0 and 0.75 / 0.625 -> +10 % and +20 %.
    assert cbam["cbam_added_float32"] == pytest.approx(10.0)
    assert cbam["cbam_added_bfloat16"] == pytest.approx(20.0)
    assert twin["bfloat16_seconds"] is None and twin["speedup"] is None


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
    assert "3x3-conv peak ratio bf16 / fp32" in text and "% of conv peak" in text
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
