"""rmib.training: precision, strategy, optimizer, run directory, checkpoints, resume."""

from __future__ import annotations

import json
import math
import shutil
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tomllib
from sklearn.utils.class_weight import compute_class_weight

from rmib import training
from rmib.config import STRATEGIES, TrainConfig
from rmib.errors import RmibError
from rmib.training import (
    RunDirectory,
    apply_precision,
    callbacks,
    class_weights_from_labels,
    cpu_supports_bfloat16,
    devices,
    fit,
    get_strategy,
    load_model,
    make_optimizer,
    model_metadata,
    read_run_metadata,
    resolve_precision,
    runner,
    schedule_callbacks,
    set_seed,
)

pytestmark = pytest.mark.timeout(240)

N, BATCH = 32, 8
STEPS = N // BATCH  # steps per epoch of the array data below
LOSS = "binary_crossentropy"


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def tiny_model(name="tiny"):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def arrays(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("float32")[:, None]
    return x, y


def config(**changes):
    base = dict(
        epochs=2,
        batch_size=BATCH,
        learning_rate=0.01,
        precision="float32",
        tensorboard=False,
        monitor="val_loss",
    )
    return TrainConfig(**{**base, **changes})


def run_fit(run_dir, cfg, **kwargs):
    kwargs.setdefault("metrics", ["accuracy"])
    return fit(
        kwargs.pop("model", tiny_model),
        kwargs.pop("train_data", arrays(0)),
        kwargs.pop("val_data", arrays(1, 16)),
        config=cfg,
        run_dir=run_dir,
        loss=LOSS,
        verbose=kwargs.pop("verbose", 0),
        **kwargs,
    )


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


class InterruptAfter(keras.callbacks.Callback):
    """Simulates a crash (Ctrl-C) at the end of an epoch, after rmib's checkpoint."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def poly_lr(lr, step, total, power):
    return lr * (1.0 - min(step, total) / total) ** power


# --------------------------------------------------------------------------- precision


def write_cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
    return path


def test_cpu_bfloat16_flags(tmp_path):
    assert cpu_supports_bfloat16(write_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_bf16"))
    assert cpu_supports_bfloat16(write_cpuinfo(tmp_path, "fpu avx2 amx_bf16 amx_tile"))
    assert not cpu_supports_bfloat16(write_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f fma"))
    assert not cpu_supports_bfloat16(tmp_path / "missing")


def test_auto_precision_on_this_machine():
    # Independent of rmib's parser: what this machine's CPU and GPUs say.
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if tf.config.list_physical_devices("GPU"):
        expected = "mixed_float16"
    elif flags & {"amx_bf16", "avx512_bf16"}:
        expected = "mixed_bfloat16"
    else:
        expected = "float32"
    assert resolve_precision("auto") == expected


def test_precision_resolution_mocked(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "CPUINFO", write_cpuinfo(tmp_path, "avx2 avx512_bf16"))
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0"])
    assert resolve_precision("auto") == "mixed_float16"
    assert resolve_precision("mixed_float16") == "mixed_float16"
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    assert resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(devices, "CPUINFO", write_cpuinfo(tmp_path, "avx2 avx512f fma"))
    assert resolve_precision("auto") == "float32"
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert resolve_precision("float32") == "float32"
    with pytest.raises(RmibError, match="hundreds of times slower.*mixed_bfloat16"):
        resolve_precision("mixed_float16")
    assert resolve_precision("mixed_float16", allow_slow=True) == "mixed_float16"
    with pytest.raises(RmibError, match="unknown precision 'fp16'.*auto, float32, mixed_float16"):
        resolve_precision("fp16")


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_each_policy_gives_float32_outputs_and_finite_loss(precision):
    assert apply_precision(precision, allow_slow=True) == precision
    assert keras.mixed_precision.global_policy().name == precision
    model = tiny_model()
    compute = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
    assert model.layers[1].compute_dtype == compute[precision]
    model.compile(optimizer=make_optimizer(config(), STEPS), loss=LOSS)
    optimizer = model.optimizer
    if precision == "mixed_float16":  # wrapped once, by rmib; Keras' compile leaves it
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert not isinstance(optimizer.inner_optimizer, keras.optimizers.LossScaleOptimizer)
    else:
        assert not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = arrays()
    loss = model.train_on_batch(x, y)
    assert math.isfinite(float(loss))
    assert model(x[:2]).dtype == "float32"


def test_model_with_low_precision_outputs_is_refused():
    apply_precision("mixed_bfloat16")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))  # bfloat16 output
    with pytest.raises(ValueError, match="bfloat16.*dtype='float32'"):
        runner._check_float32_outputs(model)


# --------------------------------------------------------------------------- strategy


def test_strategies(monkeypatch):
    assert set(STRATEGIES) - {"auto"} == set(devices._STRATEGY_BUILDERS)
    assert get_strategy("auto") is tf.distribute.get_strategy()  # no GPU here
    assert get_strategy("default") is tf.distribute.get_strategy()
    assert isinstance(get_strategy("mirrored"), tf.distribute.MirroredStrategy)
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0", "GPU:1"])
    assert devices._auto_strategy() == "mirrored"
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0"])
    assert devices._auto_strategy() == "default"
    with pytest.raises(RmibError, match="unknown strategy 'tpu9'.*auto, default, mirrored"):
        get_strategy("tpu9")


# --------------------------------------------------------------------------- optimizer


def test_optimizer_variants():
    adam = make_optimizer(config(learning_rate=2e-4))
    assert isinstance(adam, keras.optimizers.Adam)
    assert float(adam.learning_rate) == pytest.approx(2e-4)
    assert adam.weight_decay is None
    sgd = make_optimizer(config(optimizer="sgd", learning_rate=0.03, weight_decay=5e-4))
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.momentum == pytest.approx(0.9)
    assert sgd.weight_decay == pytest.approx(5e-4)
    assert schedule_callbacks(config()) == []


def test_poly_schedule_follows_the_formula():
    cfg = config(optimizer="sgd", learning_rate=0.03, lr_schedule="poly", epochs=5)
    optimizer = make_optimizer(cfg, steps_per_epoch=7)
    total = 5 * 7
    for step in (0, 1, 17, 34, 35, 50):
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == pytest.approx(
            poly_lr(0.03, step, total, 0.9), rel=1e-5, abs=1e-9
        )
    with pytest.raises(RmibError, match="steps_per_epoch"):
        make_optimizer(cfg, steps_per_epoch=None)


def test_plateau_schedule_cuts_the_rate(tmp_path):
    # In "max" mode a falling loss never improves, so every epoch after the
    # first is a plateau of patience 1.
    cfg = config(
        epochs=3,
        lr_schedule="plateau",
        plateau_patience=1,
        plateau_factor=0.5,
        monitor="loss",
        monitor_mode="max",
        restore_best=False,
    )
    (callback,) = schedule_callbacks(cfg)
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    x, y = arrays()
    _, history = run_fit(tmp_path / "run", cfg, train_data=(x, y), val_data=None)
    losses = history["loss"]
    assert losses[1] < losses[0] and losses[2] < losses[1]
    assert history["learning_rate"] == pytest.approx([0.01, 0.01, 0.005])  # at epoch start


def test_plateau_waits_only_on_validated_epochs():
    """Epochs whose monitor is NaN (validation every N epochs) neither wait nor cut the rate."""
    (callback,) = schedule_callbacks(
        config(lr_schedule="plateau", plateau_patience=2, plateau_factor=0.5, monitor="val_aupr")
    )
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, {"val_aupr": float("nan")})  # not validated before the first
    assert callback.get_state() == {"best": None, "wait": 0, "cooldown_counter": 0}
    rates = []
    for value in (0.3, float("nan"), float("nan"), float("nan"), 0.2, float("nan"), 0.2):
        callback.on_epoch_end(len(rates), {"val_aupr": value})
        rates.append(float(model.optimizer.learning_rate.numpy()))
    # Two validated epochs without improvement (0.2, 0.2) after the best 0.3: one cut,
    # at the second of them; the NaN epochs in between count for nothing.
    assert rates == pytest.approx([0.01] * 6 + [0.005])
    assert callback.get_state()["wait"] == 0 and callback.get_state()["best"] == 0.3


# --------------------------------------------------------------------------- small helpers


def test_class_weights_match_sklearn():
    labels = np.array([0] * 7 + [1] * 3)
    ours = class_weights_from_labels(labels)
    reference = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    assert ours == pytest.approx({0: reference[0], 1: reference[1]})
    assert ours == pytest.approx({0: 10 / 14, 1: 10 / 6})  # n / (2 n_c) by hand
    with pytest.raises(RmibError, match="no class 1"):
        class_weights_from_labels([0, 0, 0])
    with pytest.raises(ValueError, match="binary"):
        class_weights_from_labels([0, 1, 2])


def test_set_seed_repeats_random_numbers_and_sets_determinism():
    set_seed(7)
    first = (np.random.rand(), float(keras.random.uniform(())), float(tf.random.uniform(())))
    set_seed(7)
    second = (np.random.rand(), float(keras.random.uniform(())), float(tf.random.uniform(())))
    assert first == second
    from tensorflow.python.framework import config as tf_config

    try:
        set_seed(7, deterministic=True)
        assert tf_config.is_op_determinism_enabled()
    finally:
        tf_config.disable_op_determinism()


# --------------------------------------------------------------------------- run directory


def test_run_directory_files(tmp_path):
    run_path = tmp_path / "run"
    cfg = config(tensorboard=True)
    metadata = {"task": "classify", "lesion": "EX", "backbone": "vgg16", "image_size": 8}
    model, history = run_fit(run_path, cfg, metadata=metadata)

    run = RunDirectory(run_path)
    assert tomllib.loads(run.config_path.read_text())["train"]["epochs"] == 2
    saved = json.loads(run.metadata_path.read_text())
    assert {k: saved[k] for k in metadata} == metadata
    assert saved["precision"] == "float32"
    assert saved["rmib_version"] and saved["created"]
    rows = run.read_history()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
    assert history["val_loss"] == [r["val_loss"] for r in rows]
    metrics = json.loads(run.metrics_path.read_text())["training"]
    assert metrics["epochs_trained"] == 2 and metrics["monitor"] == "val_loss"
    assert metrics["best"] == pytest.approx(min(history["val_loss"]))
    for name in ("last.keras", "best.keras", "state.json"):
        assert (run.checkpoints_dir / name).is_file(), name
    state = json.loads(run.state_path().read_text())
    assert state["epoch"] == 2 and state["iterations"] == 2 * STEPS
    assert run.model_path.is_file()
    assert any(run.tensorboard_dir.rglob("events.out.tfevents.*"))
    leftovers = [p.name for p in run_path.rglob(".*") if p.name.endswith(".tmp")]
    assert leftovers == []

    # Starting again in the same directory without --resume is refused.
    with pytest.raises(RmibError, match="already holds a run.*--resume"):
        run_fit(run_path, cfg)


def test_best_checkpoint_tracks_monitor_and_final_model_has_best_weights(tmp_path):
    cfg = config(epochs=3, monitor="val_loss", monitor_mode="max")  # best = worst val loss
    x_val, y_val = arrays(1, 16)
    model, history = run_fit(tmp_path / "run", cfg, val_data=(x_val, y_val))
    run = RunDirectory(tmp_path / "run")
    best_epoch = int(np.argmax(history["val_loss"])) + 1
    state = run.read_state()
    assert state["best_epoch"] == best_epoch
    assert state["best"] == pytest.approx(max(history["val_loss"]))
    best = load_model(run.checkpoint_path("best"))
    best.compile(loss=LOSS)
    assert best.evaluate(x_val, y_val, verbose=0) == pytest.approx(
        history["val_loss"][best_epoch - 1], rel=1e-5
    )
    assert read_run_metadata(run.checkpoint_path("best"))["checkpoint"]["epoch"] == best_epoch
    final = load_model(run.path)
    for a, b in zip(final.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_early_stopping(tmp_path):
    # Falling loss in "max" mode: the best epoch is the first, patience 1 stops after the second.
    cfg = config(epochs=6, monitor="loss", monitor_mode="max", early_stopping_patience=1)
    _, history = run_fit(tmp_path / "run", cfg, model=tiny_model(), val_data=None)
    assert history["epoch"] == [1, 2]
    metrics = RunDirectory(tmp_path / "run").read_metrics()["training"]
    assert metrics["early_stopped"] is True and metrics["best_epoch"] == 1


class _FakeClock:
    """A time.monotonic that advances only when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class _SpendSeconds(keras.callbacks.Callback):
    """Each epoch "takes" the given seconds of the fake clock (before rmib's callbacks end it)."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, list(seconds)

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.now += self.seconds[epoch]


def test_time_limit_stops_when_another_epoch_would_not_fit(tmp_path, monkeypatch):
    # Limit 1 minute, epochs of 25 s: after epoch 1, 25 + 25 (mean) = 50 <= 60 goes on;
    # after epoch 2, 50 + 25 = 75 > 60 stops. Worked by hand.
    clock = _FakeClock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    cfg = config(epochs=10, monitor="loss", time_limit=1.0)
    spend = _SpendSeconds(clock, [25.0] * 10)
    _, history = run_fit(tmp_path / "run", cfg, val_data=None, validation_callbacks=[spend])
    assert history["epoch"] == [1, 2]
    run = RunDirectory(tmp_path / "run")
    state = run.read_state()
    assert state["time_limited"] is True and state["train_seconds"] == pytest.approx(50.0)
    metrics = run.read_metrics()["training"]
    assert metrics["time_limited"] is True and metrics["epochs_trained"] == 2
    assert run.model_path.is_file()

    # Resumed with the same limit: finished, nothing to train.
    recorder = EpochRecorder()
    run_fit(tmp_path / "run", cfg, val_data=None, resume=True, extra_callbacks=[recorder])
    assert recorder.epochs == []
    # With a longer limit (2 min) it goes on from 50 s: after epoch 3, 75 + 25 = 100 <= 120;
    # after epoch 4, 100 + 25 = 125 > 120 stops.
    longer = config(epochs=10, monitor="loss", time_limit=2.0)
    spend = _SpendSeconds(clock, [25.0] * 10)
    _, history = run_fit(
        tmp_path / "run", longer, val_data=None, resume=True, validation_callbacks=[spend]
    )
    assert history["epoch"] == [1, 2, 3, 4]
    assert run.read_state()["train_seconds"] == pytest.approx(100.0)


def test_time_limit_never_stops_a_run_without_one(tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    spend = _SpendSeconds(clock, [3600.0] * 3)
    cfg = config(epochs=3, monitor="loss")
    _, history = run_fit(tmp_path / "run", cfg, val_data=None, validation_callbacks=[spend])
    assert history["epoch"] == [1, 2, 3]
    assert RunDirectory(tmp_path / "run").read_state()["time_limited"] is False


def test_time_limit_must_not_be_negative():
    with pytest.raises(RmibError, match="time_limit"):
        config(time_limit=-1.0)


class _ScoreEvery(keras.callbacks.Callback):
    """Logs "val_score" (falling) only every `every` epochs, NaN in between."""

    def __init__(self, every):
        super().__init__()
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        logs["val_score"] = 1.0 / done if done % self.every == 0 else float("nan")


def test_early_stopping_waits_for_a_measured_monitor(tmp_path):
    # Scores at epochs 3 (1/3, the best) and 6 (1/6, worse in "max" mode); NaN in between.
    # Patience 2: epochs 1-2 do not stop (nothing measured yet); 4-5 are not measured;
    # epoch 6 is measured, 6 - 3 >= 2: stop there.
    cfg = config(epochs=20, monitor="val_score", monitor_mode="max", early_stopping_patience=2)
    _, history = run_fit(
        tmp_path / "run", cfg, val_data=None, validation_callbacks=[_ScoreEvery(3)]
    )
    assert history["epoch"] == [1, 2, 3, 4, 5, 6]
    state = RunDirectory(tmp_path / "run").read_state()
    assert state["best_epoch"] == 3 and state["early_stopped"] is True


# --------------------------------------------------------------------------- resume


def test_resume_continues_where_the_run_stopped(tmp_path, capsys):
    cfg = config(epochs=4, optimizer="sgd", lr_schedule="poly", learning_rate=0.05)

    _, full_history = run_fit(tmp_path / "full", cfg)
    full_iterations = RunDirectory(tmp_path / "full").read_state()["iterations"]
    assert full_iterations == 4 * STEPS

    run_path = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_fit(run_path, cfg, extra_callbacks=[InterruptAfter(epoch=1)])
    run = RunDirectory(run_path)
    assert run.read_state()["epoch"] == 2 and not run.model_path.exists()
    # A crash after the history row of epoch 3 but before its checkpoint.
    rows = run.read_history()
    run.write_history([*rows, {**rows[-1], "epoch": 3}])

    recorder = EpochRecorder()
    model, history = run_fit(run_path, cfg, resume=True, extra_callbacks=[recorder])
    assert recorder.epochs == [2, 3]
    assert int(model.optimizer.iterations) == full_iterations
    assert history["epoch"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in run.read_history()] == [1, 2, 3, 4]
    expected_lr = [poly_lr(0.05, e * STEPS, 4 * STEPS, 0.9) for e in (0, 1, 2, 3)]
    assert history["learning_rate"] == pytest.approx(expected_lr, abs=1e-7)
    assert full_history["learning_rate"] == pytest.approx(expected_lr, abs=1e-7)
    assert run.model_path.is_file()

    # Resuming a finished run trains nothing and returns the final model.
    recorder = EpochRecorder()
    capsys.readouterr()
    again, history = run_fit(run_path, cfg, resume=True, extra_callbacks=[recorder], verbose=1)
    assert "already finished at epoch 4" in capsys.readouterr().out
    assert recorder.epochs == []
    assert history["epoch"] == [1, 2, 3, 4]
    for a, b in zip(again.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class PoisonWeights(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                layer = self.model.layers[-1]
                layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])

    run_path = tmp_path / "run"
    cfg = config(epochs=3)
    with pytest.raises(RmibError, match=r"loss became nan at epoch 2.*last\.keras \(epoch 1\)"):
        run_fit(run_path, cfg, extra_callbacks=[PoisonWeights()])
    run = RunDirectory(run_path)
    assert run.read_state()["epoch"] == 1
    assert [r["epoch"] for r in run.read_history()] == [1]
    good = load_model(run.checkpoint_path("last"))
    assert all(np.isfinite(w).all() for w in good.get_weights())
    assert not run.model_path.exists()


# --------------------------------------------------------------------------- loading


def test_load_model_refuses_lambda_unless_unsafe(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    path = RunDirectory(tmp_path / "run").save_model(model, tmp_path / "lambda.keras", {})
    with pytest.raises(RmibError, match="lambda.keras.*Lambda.*--unsafe-load"):
        load_model(path)
    loaded = load_model(path, unsafe=True)
    np.testing.assert_allclose(loaded(np.ones((1, 3), "float32")), 2.0)


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(RmibError, match="nothing.keras: no such"):
        load_model(tmp_path / "nothing.keras")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(RmibError, match="corrupt.keras: not a readable"):
        load_model(corrupt)
    with pytest.raises(RmibError, match="corrupt.keras: not a readable"):
        read_run_metadata(corrupt)
    empty_run = RunDirectory(tmp_path / "empty")
    with pytest.raises(RmibError, match="has no model.keras"):
        load_model(empty_run.path)
    with pytest.raises(RmibError, match="not an rmib run directory"):
        read_run_metadata(empty_run.path)


def test_metadata_travels_inside_a_bare_keras_file(tmp_path):
    run = RunDirectory(tmp_path / "run")
    metadata = run.write_metadata({"lesion": "MA", "preprocessing": "clahe", "image_size": 8})
    run.save_model(tiny_model(), run.model_path)
    assert read_run_metadata(run.path) == metadata

    elsewhere = tmp_path / "elsewhere" / "copy.keras"
    elsewhere.parent.mkdir()
    shutil.copy(run.model_path, elsewhere)
    assert read_run_metadata(elsewhere) == metadata
    assert "assets/rmib_metadata/rmib.json" in zipfile.ZipFile(elsewhere).namelist()

    # Plain Keras loads the file; rmib's loader also gives the metadata back,
    # and it survives a plain `model.save` of the loaded model.
    assert isinstance(keras.saving.load_model(elsewhere), keras.Model)
    loaded = load_model(elsewhere)
    assert model_metadata(loaded) == metadata
    resaved = tmp_path / "resaved.keras"
    loaded.save(resaved)
    assert read_run_metadata(resaved) == metadata
    assert read_run_metadata(_plain_keras_file(tmp_path)) == {}


def _plain_keras_file(tmp_path):
    path = tmp_path / "plain.keras"
    tiny_model().save(path)
    return path


def test_phases_have_their_own_files_under_mirrored_strategy(tmp_path):
    run = RunDirectory(tmp_path / "run")
    cfg = config(epochs=1, strategy="mirrored", lr_schedule="poly")
    train = tf.data.Dataset.from_tensor_slices(arrays(0)).batch(BATCH)
    val = tf.data.Dataset.from_tensor_slices(arrays(1, 16)).batch(BATCH)
    # resume=True with nothing to resume starts the phase at epoch 1.
    model, history = run_fit(
        run.path, cfg, train_data=train, val_data=val, phase="global", resume=True, save_final=False
    )
    assert history["epoch"] == [1]
    # The poly schedule took its steps per epoch from the dataset's cardinality.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)
    assert isinstance(model.distribute_strategy, tf.distribute.MirroredStrategy)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == STEPS
    for path in (
        run.history_path("global"),
        run.checkpoint_path("last", "global"),
        run.checkpoint_path("best", "global"),
        run.state_path("global"),
    ):
        assert path.is_file(), path
    assert run.history_path("global").name == "history_global.csv"
    assert not run.history_path().exists() and not run.checkpoint_path("last").exists()
    assert not run.model_path.exists()  # save_final=False: an intermediate phase
    assert run.read_metrics()["training_global"]["epochs_trained"] == 1


def test_built_model_needs_the_default_strategy(tmp_path):
    with pytest.raises(ValueError, match="pass a function that builds the model"):
        run_fit(tmp_path / "run", config(strategy="mirrored"), model=tiny_model())


def test_resume_under_mixed_float16_keeps_the_loss_scale_optimizer(tmp_path):
    cfg = config(precision="mixed_float16", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "run", cfg, allow_slow=True, extra_callbacks=[InterruptAfter(0)])
    saved = load_model(tmp_path / "run" / "checkpoints" / "last.keras", compile=True)
    saved_state = [keras.ops.convert_to_numpy(v) for v in saved.optimizer.variables]

    class OptimizerAtStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.state = [keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables]

    at_start = OptimizerAtStart()
    model, history = run_fit(
        tmp_path / "run", cfg, allow_slow=True, resume=True, extra_callbacks=[at_start]
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert not isinstance(model.optimizer.inner_optimizer, keras.optimizers.LossScaleOptimizer)
    # Loss scale, its step counter, Adam's moments: all as saved after epoch 1.
    assert len(at_start.state) == len(saved_state) > 4
    for restored, expected in zip(at_start.state, saved_state, strict=True):
        np.testing.assert_array_equal(restored, expected)
    assert int(model.optimizer.iterations) == 2 * STEPS
    assert history["epoch"] == [1, 2] and all(math.isfinite(v) for v in history["loss"])


# --------------------------------------------------------------------------- issue 9 additions


class _Replicas:
    """The default strategy, claiming `n` replicas (no machine here has several)."""

    def __init__(self, n):
        self.num_replicas_in_sync = n
        self._strategy = tf.distribute.get_strategy()

    def __getattr__(self, name):
        return getattr(self._strategy, name)


def test_batch_size_is_per_replica(tmp_path, monkeypatch):
    cfg = config(epochs=1, batch_size=4)
    assert training.global_batch_size(cfg) == 4  # one replica here
    assert training.global_batch_size(cfg, _Replicas(3)) == 12
    # fit batches arrays by the global batch: 32 examples, 2 x 4 per step, 4 steps.
    monkeypatch.setattr(runner, "get_strategy", lambda name: _Replicas(2))
    run_fit(tmp_path / "run", cfg, metrics=None)
    assert RunDirectory(tmp_path / "run").read_state()["iterations"] == N // 8


def test_resume_removes_what_interrupted_atomic_writes_left(tmp_path, capsys):
    from rmib import io

    cfg = config(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "run", cfg, extra_callbacks=[InterruptAfter(0)])
    run = RunDirectory(tmp_path / "run")
    before = {p for p in run.path.rglob("*") if p.is_file()}
    # A SIGKILL inside atomic_path / atomic_write leaves their temporary files:
    # entered here and never left, they stay as a killed process leaves them.
    checkpoint_writer = io.atomic_path(run.checkpoint_path("last"))
    checkpoint_writer.__enter__().write_bytes(b"PK\x03\x04 half a checkpoint")
    history_writer = io.atomic_write(run.history_path())
    history_writer.__enter__().write("epoch,loss\n")
    stale = {p for p in run.path.rglob("*") if p.is_file()} - before
    assert len(stale) == 2 and all(p.name.startswith(".") for p in stale)
    # Files that are not rmib's temporaries, or that another worker is writing, stay.
    kept = [
        run.path / ".notes.txt",
        run.path / "notes.k3x9a0q2.keras",
        run.path / "workers" / "worker_1" / "checkpoints" / ".last.k3x9a0q2.keras",
    ]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    try:
        capsys.readouterr()
        _, history = run_fit(run.path, cfg, resume=True, verbose=1)
        assert history["epoch"] == [1, 2]
        assert "removed" in capsys.readouterr().out
        assert not any(p.exists() for p in stale)
        assert all(p.is_file() for p in kept)
        assert not [p for p in run.path.rglob(".*") if p not in kept]
    finally:
        checkpoint_writer.gen.close()
        history_writer.gen.close()


def _two_sgd_steps(mode):
    """Two steps of SGD (lr 0.1, momentum 0.9, weight decay 0.01) on loss = 0.5*w0 + 0.25*w1."""
    cfg = TrainConfig(
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=0.01,
        weight_decay_mode=mode,
    )
    optimizer = training.make_optimizer(cfg)
    weight = keras.Variable(np.array([1.0, -2.0], "float32"))
    gradient = np.array([0.5, 0.25], "float32")
    for _ in range(2):
        optimizer.apply([gradient], [weight])
    return optimizer, np.asarray(weight)


def test_coupled_weight_decay_goes_through_the_momentum():
    # Coupled (PyTorch SGD): g' = g + wd*w, v = m*v - lr*g', w = w + v.
    # Step 1: g' = [0.5 + 0.01, 0.25 - 0.02] = [0.51, 0.23]; v = [-0.051, -0.023];
    #         w = [0.949, -2.023].
    # Step 2: g' = [0.5 + 0.00949, 0.25 - 0.02023] = [0.50949, 0.22977];
    #         v = 0.9*[-0.051, -0.023] - 0.1*g' = [-0.096849, -0.043677];
    #         w = [0.852151, -2.066677].
    optimizer, weight = _two_sgd_steps("coupled")
    assert isinstance(optimizer, training.CoupledDecaySGD) and optimizer.weight_decay is None
    np.testing.assert_allclose(weight, [0.852151, -2.066677], rtol=0, atol=1e-6)
    clone = training.CoupledDecaySGD.from_config(optimizer.get_config())
    assert clone.coupled_weight_decay == pytest.approx(0.01)


def test_decoupled_weight_decay_is_keras_weight_decay():
    # Decoupled (Keras): w = w - lr*wd*w, then v = m*v - lr*g, w = w + v.
    # Step 1: w = [0.999, -1.998]; v = [-0.05, -0.025]; w = [0.949, -2.023] (as coupled:
    #         the momentum is still empty).
    # Step 2: w = 0.999*[0.949, -2.023] = [0.948051, -2.020977];
    #         v = 0.9*[-0.05, -0.025] - 0.1*[0.5, 0.25] = [-0.095, -0.0475];
    #         w = [0.853051, -2.068477].
    optimizer, weight = _two_sgd_steps("decoupled")
    assert type(optimizer) is keras.optimizers.SGD and optimizer.weight_decay == pytest.approx(0.01)
    np.testing.assert_allclose(weight, [0.853051, -2.068477], rtol=0, atol=1e-6)


def test_weight_decay_mode_is_checked():
    with pytest.raises(RmibError, match="weight_decay_mode"):
        TrainConfig(weight_decay_mode="l2")
