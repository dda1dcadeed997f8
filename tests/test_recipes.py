"""Every recipe in the repository loads through the one config loader."""

from pathlib import Path

import pytest

from rmib.config import load_config
from rmib.methods.classifier.config import PretrainConfig
from rmib.methods.segment_config import SegmentConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "pretrain").glob("*.toml")), ids=lambda p: p.name)
def test_pretrain_recipes_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.image_size == 480 and cfg.backbone in ("vgg16", "resnet50")


@pytest.mark.parametrize("path", sorted((ROOT / "segment").glob("*.toml")), ids=lambda p: p.name)
def test_segment_recipes_load(path):
    cfg = load_config(SegmentConfig, path)
    assert cfg.lesion in ("EX", "HE", "MA", "SE")


def test_there_is_a_recipe_per_lesion_and_encoder():
    names = {p.stem for p in (ROOT / "segment").glob("idrid_*_*.toml")}
    for lesion in ("ex", "he", "ma", "se"):
        for encoder in ("vgg16", "vgg16_cbam", "resnet50", "resnet50_cbam"):
            assert f"idrid_{lesion}_{encoder}" in names
