"""benchmarks/step_ablation.py: the variant strings (the benchmark itself is not run here)."""

from __future__ import annotations

import pytest

from benchmarks.step_ablation import parse_variant

pytestmark = pytest.mark.timeout(60)


def test_plain_variant_uses_rmib_adam_and_the_default_batch():
    assert parse_variant(" resnet50 ", 4) == {
        "name": "resnet50",
        "model": "resnet50",
        "cbam": False,
        "implementation": "fused",
        "jit": False,
        "keras_adam": False,
        "batch": 4,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("resnet50+kadam", {"keras_adam": True, "jit": False, "batch": 4}),
        ("resnet50_cbam+kadam", {"cbam": True, "keras_adam": True}),
        ("resnet50_cbam/plain+jit+b8", {"implementation": "plain", "jit": True, "batch": 8}),
        ("vgg16+b16+kadam+jit", {"model": "vgg16", "keras_adam": True, "jit": True, "batch": 16}),
    ],
)
def test_options_in_any_order(text, expected):
    variant = parse_variant(text, 4)
    assert variant["name"] == text
    assert {key: variant[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resnet101", "bad variant 'resnet101'"),
        ("resnet50/plain", "needs a _cbam model"),
        ("resnet50+adam", r"unknown option \+adam"),
        ("resnet50+b0", r"unknown option \+b0"),
        ("resnet50+kadam+kadam", "given twice"),
        ("resnet50+b4+b8", "given twice"),
    ],
)
def test_bad_variants_name_the_problem(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_variant(text, 4)
