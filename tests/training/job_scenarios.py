"""`rmib.training.TrainingJob`: every segmenter stops, resumes and reports alike.

The scenario every `tests/training/test_job_<method>.py` runs (a file per method, so
that `pytest -n 2 --dist loadfile` spreads them over the workers). One scenario for each
method, on a fake clock (every epoch costs exactly 60 seconds; no wall-clock
assertion): a run with `time_limit` 2.5 minutes stops after the last epoch that fits
in the whole run (phases together), ends with a `model.keras`, and a resume with a
longer limit trains exactly the epochs left, to the state an uninterrupted run ends in.
"""

from __future__ import annotations

import dataclasses

from rmib import training
from rmib.config import TrainConfig
from rmib.data.readers import read_dataset
from rmib.data.synthetic import write_dataset
from rmib.methods.segment_config import Dual2NetConfig, LocalGlobalConfig, SegmentConfig
from rmib.tasks import SEGMENT_METHODS, load_segmenter
from tests.conftest import EPOCH_SECONDS

LIMIT_MINUTES = 2.5  # 150 s: two epochs fit (60 + 60 + another 60 > 150 after the second)


def _records(folder):
    """Training and validation records (4 and 1) of a tiny synthetic IDRiD tree in `folder`."""
    root = write_dataset(folder, "idrid", count=5, size=64, seed=0)
    annotated = [r for r in read_dataset(root).records if r.masks.get("EX") is not None]
    return annotated[1:], annotated[:1]


def _train_config(epochs):
    return TrainConfig(
        epochs=epochs,
        batch_size=2,
        steps_per_epoch=1,
        monitor="val_aupr",
        monitor_mode="max",
        precision="float32",
        tensorboard=False,
        time_limit=LIMIT_MINUTES,
    )


# name -> (config, {phase: epochs trained when the limit stops it}, {phase: epochs at the end},
#          the phase the first run ends in)
SCENARIOS = {
    # frozen 1 epoch + fine-tune 2: the limit is the whole run's, so fine-tune stops
    # after 1 epoch (a limit per phase would have let it run both).
    "encoder-decoder": (
        SegmentConfig(
            lesion="EX",
            model="encoder-decoder",
            encoder="vgg16",
            freeze_encoder="yes",
            fine_tune_after=1,
            patch_size=64,
            patches_per_epoch=2,
            predict_tile=64,
            augment="none",
            train=_train_config(3),
        ),
        {"frozen": 1, "fine-tune": 1},
        {"frozen": 1, "fine-tune": 2},
        "fine-tune",
    ),
    # four phases of one epoch: the limit ends the run after "local", whose LocalNet
    # becomes the run's model; the resume trains "fusion" and "joint".
    "local-global": (
        SegmentConfig(
            lesion="EX",
            model="local-global",
            patch_size=32,
            predict_batch=32,
            augment="none",
            train=_train_config(1),
            local_global=LocalGlobalConfig(
                global_size=32, base_filters=4, global_depth=2, local_depth=2, epochs_per_phase=1
            ),
        ),
        {"global": 1, "local": 1},
        {"global": 1, "local": 1, "fusion": 1, "joint": 1},
        "local",
    ),
    # one phase of 3 epochs: stops after 2.
    "dual2net": (
        SegmentConfig(
            lesion="EX",
            model="dual2net",
            encoder="vgg16",
            train=_train_config(3),
            dual2net=Dual2NetConfig(image_size=[32, 32], head_filters=8),
        ),
        {None: 2},
        {None: 3},
        None,
    ),
}


def _epochs(run, phases):
    return {phase: [row["epoch"] for row in run.read_history(phase)] for phase in phases}


def run_scenario(name, tmp_path):
    """Train segmenter `name` in `tmp_path` under the limit, resume it under the same limit,
    then under a longer one. Needs the `fake_clock` fixture (`eager` makes it faster)."""
    cfg, stopped, final, stop_phase = SCENARIOS[name]
    train = SEGMENT_METHODS[name].train
    train_records, val_records = _records(tmp_path / "idrid")
    run = training.RunDirectory(tmp_path / "run")
    kwargs = {"verbose": 0} if name == "dual2net" else {}

    first = train(cfg, train_records, val_records, run, **kwargs)
    assert _epochs(run, final) == {p: list(range(1, stopped.get(p, 0) + 1)) for p in final}
    state = training.checkpoint_state(run, stop_phase)
    assert state["time_limited"] and state["train_seconds"] == stopped[stop_phase] * EPOCH_SECONDS
    assert run.model_path.is_file() and 0.0 <= first["aupr"] <= 1.0
    if name == "local-global":  # the run ended with LocalNet
        assert training.read_run_metadata(run.model_path)["network"] == "local"
    assert isinstance(load_segmenter(run.path), SEGMENT_METHODS[name].segmenter)

    # The same limit again: nothing left to train, the same model.
    saved = run.model_path.read_bytes()
    again = train(cfg, train_records, val_records, run, resume=True, **kwargs)
    assert _epochs(run, final) == {p: list(range(1, stopped.get(p, 0) + 1)) for p in final}
    assert again == first and run.model_path.read_bytes() == saved

    # A longer limit: exactly the epochs left, to the end of the last phase.
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_limit=60.0))
    last = train(longer, train_records, val_records, run, resume=True, **kwargs)
    assert _epochs(run, final) == {p: list(range(1, n + 1)) for p, n in final.items()}
    last_phase = list(final)[-1]
    state = training.checkpoint_state(run, last_phase)
    assert state["epoch"] == final[last_phase] and not state["time_limited"]
    assert state["train_seconds"] == final[last_phase] * EPOCH_SECONDS
    assert (
        run.read_metrics()["training" if last_phase is None else f"training_{last_phase}"][
            "epochs_trained"
        ]
        == final[last_phase]
    )
    assert 0.0 <= last["aupr"] <= 1.0
    assert isinstance(load_segmenter(run.path), SEGMENT_METHODS[name].segmenter)
    if name == "local-global":
        assert training.read_run_metadata(run.model_path)["network"] == "fused"
