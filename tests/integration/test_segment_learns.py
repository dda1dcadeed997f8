"""A segmenter trained for a few epochs on synthetic exudates beats the same model untrained."""

import json

import keras
import pytest

from rmib import training
from rmib.config import load_config
from rmib.data.pipeline import Preprocessing, load_examples
from rmib.evaluation import evaluate_examples
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter
from rmib.methods.segment_config import SegmentConfig
from rmib.methods.segment_data import lesion_records, split_records
from rmib.tasks import run_segment

pytestmark = pytest.mark.timeout(600)


def test_training_raises_validation_aupr_by_at_least_0_1(synthetic_idrid, tmp_path):
    cfg = load_config(
        SegmentConfig,
        None,
        {
            "data": [str(synthetic_idrid)],
            "lesion": "EX",
            "encoder": "vgg16",
            "weights": "none",
            "patch_size": 64,
            "patches_per_epoch": 96,
            "predict_tile": 128,
            "val_fraction": 0.25,
            "val_every": 4,  # validated once, after the last epoch (the metric compared)
            "out": str(tmp_path / "run"),
            "train.epochs": 4,
            "train.batch_size": 8,
            "train.learning_rate": 1e-3,
            "train.precision": "float32",
            "train.seed": 0,
            "train.tensorboard": False,
        },
    )
    trained = run_segment(cfg)

    # The same architecture, freshly initialised at the same seed, on the same images.
    from rmib.methods.encoder_decoder.model import build_encoder_decoder

    training.apply_precision("float32")
    keras.utils.set_random_seed(cfg.train.seed)
    untrained_model = build_encoder_decoder("vgg16", freeze_encoder=False)
    records = lesion_records(cfg.data, "EX")
    _, val_records = split_records(records, cfg)
    examples, _ = load_examples(val_records, Preprocessing(method="clahe"), "EX")
    meta = training.read_run_metadata(cfg.out)
    untrained = evaluate_examples(TiledSegmenter(untrained_model, meta, 128, 0.125, 2), examples)

    assert trained["aupr"] >= untrained["aupr"] + 0.1, (trained, untrained)
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
    assert stored["aupr"] == pytest.approx(trained["aupr"])
