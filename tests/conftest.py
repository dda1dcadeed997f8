"""Shared tiny fixtures: synthetic datasets and models trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, or skip when this clone has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_kaggle(tmp_path_factory):
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("kaggle"), "kaggle", 16, 96, seed=1)


@pytest.fixture(scope="session")
def synthetic_idrid(tmp_path_factory):
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("idrid"), "idrid", 10, 128, seed=2)


def invoke(args):
    """Run the rmib CLI in-process; return the click Result."""
    from click.testing import CliRunner

    from rmib.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, synthetic_kaggle):
    """A tiny VGG16-CBAM stage-1 run, trained once through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    result = invoke(
        [
            "pretrain",
            "--data",
            synthetic_kaggle,
            "--backbone",
            "vgg16",
            "--cbam",
            "--image-size",
            64,
            "--epochs",
            2,
            "--batch-size",
            4,
            "--val-fraction",
            0.25,
            "--out",
            out,
            "--seed",
            0,
        ]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def segment_run(tmp_path_factory, synthetic_idrid, pretrain_run):
    """A tiny EX segmenter on the transferred, frozen stage-1 encoder, trained once."""
    out = tmp_path_factory.mktemp("runs") / "segment"
    result = invoke(
        [
            "segment",
            "--data",
            synthetic_idrid,
            "--lesion",
            "EX",
            "--encoder",
            pretrain_run,
            "--patch-size",
            64,
            "--patches-per-epoch",
            32,
            "--batch-size",
            8,
            "--epochs",
            2,
            "--val-fraction",
            0.2,
            "--predict-tile",
            128,
            "--out",
            out,
            "--seed",
            0,
        ]
    )
    assert result.exit_code == 0, result.output
    return out
