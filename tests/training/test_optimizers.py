"""rmib.training.optimizers: FusedAdam (one ResourceApplyAdam per variable) against a NumPy
Adam worked here and against keras.optimizers.Adam, in every way rmib trains."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from rmib.config import TrainConfig
from rmib.training import (
    CoupledDecayAdam,
    FusedAdam,
    load_model,
    make_optimizer,
    optimizers,
    runner,
)
from tests.training.test_training import (
    LOSS,
    InterruptAfter,
    arrays,
    config,
    run_fit,
    tiny_model,
)
from tests.training.test_training import STEPS as STEPS_PER_EPOCH

pytestmark = pytest.mark.timeout(240)

SHAPES = ((3, 4), (5,), (2, 2, 3))
STEPS = 6


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def numpy_adam(weights, gradients, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7, coupled=0.0):
    """Adam (Kingma & Ba, Algorithm 1 with epsilon-hat, as Keras writes it) in float64."""
    w = [np.asarray(x, np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, step_gradients in enumerate(gradients, start=1):
        for i, g in enumerate(step_gradients):
            g = np.asarray(g, np.float64) + coupled * w[i]
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
            alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
            w[i] = w[i] - alpha * m[i] / (np.sqrt(v[i]) + epsilon)
    return w, m, v


def start_weights(seed=0):
    # Magnitudes in [0.5, 2]: relative errors of the weights are not blown up near zero.
    rng = np.random.default_rng(seed)
    return [
        (rng.uniform(0.5, 2.0, s) * rng.choice([-1.0, 1.0], s)).astype("float32") for s in SHAPES
    ]


def step_gradients(seed=1, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype("float32") for s in SHAPES] for _ in range(steps)]


def run_optimizer(optimizer, gradients=None, weights=None, graph=True):
    """The variables and the momentum / velocity slots after `gradients`' steps."""
    variables = [keras.Variable(w) for w in weights or start_weights()]
    optimizer.build(variables)

    def apply(grads):
        optimizer.apply(grads, variables)

    apply = tf.function(apply) if graph else apply
    for grads in gradients or step_gradients():
        apply([tf.constant(g) for g in grads])
    momenta = [np.asarray(optimizer._momentums[i]) for i in range(len(variables))]
    velocities = [np.asarray(optimizer._velocities[i]) for i in range(len(variables))]
    return [np.asarray(v) for v in variables], momenta, velocities


def assert_close(actual, expected, rtol):
    """Relative to each array's largest magnitude (moments cross zero)."""
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


# --------------------------------------------------------------------------- the update


@pytest.mark.parametrize("graph", [True, False], ids=["tf.function", "eager"])
def test_fused_adam_is_adam_worked_in_numpy(graph):
    lr = 0.01
    weights, momenta, velocities = run_optimizer(FusedAdam(learning_rate=lr), graph=graph)
    expected, _, _ = numpy_adam(start_weights(), step_gradients(), lr)
    for w, e in zip(weights, expected, strict=True):
        np.testing.assert_allclose(w, e, rtol=1e-6)
    # The kernel forms 1 - beta in float32 from float32 betas: the Adam whose betas are
    # float32(0.9) and float32(0.999) in the moments and their bias corrections alike.
    b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))
    w32, m32, v32 = numpy_adam(start_weights(), step_gradients(), lr, b1, b2)
    assert_close(weights, w32, 1e-6)
    assert_close(momenta, m32, 1e-6)
    assert_close(velocities, v32, 1e-6)


def test_fused_adam_follows_the_numbers_not_the_sign():
    # A NumPy Adam with another rate or beta is not matched: the comparison can fail.
    weights, _, _ = run_optimizer(FusedAdam(learning_rate=0.01, beta_1=0.8))
    other, _, _ = numpy_adam(start_weights(), step_gradients(), 0.01)
    errors = [np.max(np.abs(w - o) / np.abs(o)) for w, o in zip(weights, other, strict=True)]
    assert max(errors) > 1e-4
    same, _, _ = numpy_adam(start_weights(), step_gradients(), 0.01, beta_1=0.8)
    for w, e in zip(weights, same, strict=True):
        np.testing.assert_allclose(w, e, rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.1},
        {"clipnorm": 0.5},
        {"global_clipnorm": 1.0},
        {"amsgrad": True},
        {"gradient_accumulation_steps": 2},
        {"use_ema": True, "ema_overwrite_frequency": 3},
        {"learning_rate": keras.optimizers.schedules.PolynomialDecay(0.01, 5, 0.0)},
    ],
    ids=lambda o: ",".join(o) or "plain",
)
def test_fused_adam_matches_keras_adam(options):
    options = {"learning_rate": 1e-3, **options}
    fused = run_optimizer(FusedAdam(**options))
    kept = run_optimizer(keras.optimizers.Adam(**options))
    for w, k in zip(fused[0], kept[0], strict=True):
        np.testing.assert_allclose(w, k, rtol=1e-6)
    assert_close(fused[1], kept[1], 1e-6)
    # Keras rounds 1 - 0.999 to float32 (0.001f), the kernel computes 1 - 0.999f:
    # v differs by ~1.3e-5 relative (see FusedAdam's docstring); never more.
    assert_close(fused[2], kept[2], 2e-5)


def test_decoupled_weight_decay_is_kept_before_the_update():
    lr, wd = 0.01, 0.1
    weights, _, _ = run_optimizer(FusedAdam(learning_rate=lr, weight_decay=wd), graph=False)
    # Keras' decoupled decay: w <- w - lr * wd * w, then Adam's step on the new w.
    w = [np.asarray(x, np.float64) for x in start_weights()]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(step_gradients(), start=1):
        for i, g in enumerate(grads):
            w[i] = w[i] - lr * wd * w[i]
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g.astype(np.float64) ** 2
            w[i] = w[i] - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m[i] / (np.sqrt(v[i]) + 1e-7)
    for actual, expected in zip(weights, w, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_coupled_decay_adam_adds_the_decay_to_the_gradient_of_the_fused_update():
    lr, wd = 0.01, 0.05
    optimizer = CoupledDecayAdam(learning_rate=lr, coupled_weight_decay=wd)
    assert isinstance(optimizer, FusedAdam) and optimizer.weight_decay is None
    weights, _, _ = run_optimizer(optimizer)
    expected, _, _ = numpy_adam(start_weights(), step_gradients(), lr, coupled=wd)
    for w, e in zip(weights, expected, strict=True):
        np.testing.assert_allclose(w, e, rtol=1e-6)
    assert op_counts(CoupledDecayAdam(coupled_weight_decay=wd))["ResourceApplyAdam"] == len(SHAPES)


# --------------------------------------------------------------------------- the graph


def op_counts(optimizer, n_variables=3) -> collections.Counter:
    """Op types of one traced `optimizer.apply` over `n_variables` variables."""
    variables = [keras.Variable(np.ones((4, 4), "float32")) for _ in range(n_variables)]
    optimizer.build(variables)

    @tf.function
    def apply(grads):
        optimizer.apply(grads, variables)

    spec = [tf.TensorSpec((4, 4), tf.float32)] * n_variables
    graph = apply.get_concrete_function(spec).graph
    return collections.Counter(op.type for op in graph.get_operations())


def test_update_graph_is_one_kernel_per_variable():
    fused = {n: op_counts(FusedAdam(), n) for n in (4, 8)}
    keras_adam = {n: op_counts(keras.optimizers.Adam(), n) for n in (4, 8)}
    assert fused[4]["ResourceApplyAdam"] == 4 and fused[8]["ResourceApplyAdam"] == 8
    assert keras_adam[8]["ResourceApplyAdam"] == 0

    def per_variable(counts):  # ops each further variable adds (not its input placeholders)
        def ops(n):
            return sum(counts[n].values()) - counts[n]["Placeholder"]

        return (ops(8) - ops(4)) / 4

    # Each variable: Keras' Identity of its gradient and one ResourceApplyAdam; Keras'
    # Adam: ~25 (reads, Sub, Mul, Square, Sqrt, RealDiv, three assigns, its scalars).
    assert per_variable(fused) == 2
    assert per_variable(keras_adam) >= 20
    assert sum(fused[8].values()) < sum(keras_adam[8].values()) / 3
    # The step's scalars (beta powers, learning rate) are computed once, not per variable.
    assert fused[8]["Pow"] == fused[4]["Pow"] == 2


def test_amsgrad_sparse_gradients_and_half_variables_take_keras_update():
    assert op_counts(FusedAdam(amsgrad=True))["ResourceApplyAdam"] == 0
    sparse = tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([1]), tf.constant([4, 2]))
    dense = tf.constant([[0.5, -1.0, 2.0]], "float16")
    cases = [(sparse, "float32", (4, 2)), (dense, "float16", (1, 3))]
    for gradient, dtype, shape in cases:
        fused, kept = (keras.Variable(np.ones(shape), dtype=dtype) for _ in range(2))
        optimizer, reference = FusedAdam(0.01), keras.optimizers.Adam(0.01)
        for _ in range(3):
            optimizer.apply([gradient], [fused])
            reference.apply([gradient], [kept])
        np.testing.assert_array_equal(np.asarray(fused), np.asarray(kept))
        assert not np.array_equal(np.asarray(fused), np.ones(shape))
    assert np.asarray(fused).dtype == np.float16


# --------------------------------------------------------------------------- training


def train_tiny(optimizer, steps=3, jit_compile=False, seed=0):
    """A tiny model's weights after `steps` of train_on_batch with `optimizer`."""
    keras.utils.set_random_seed(seed)
    model = tiny_model()
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    x, y = arrays(seed)
    for step in range(steps):
        model.train_on_batch(x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8])
    return model.get_weights()


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often ResourceApplyAdam was put into a graph (or run eagerly)."""
    calls = []
    kernel = tf.raw_ops.ResourceApplyAdam

    def counted(**kwargs):
        calls.append(kwargs["var"].dtype)
        return kernel(**kwargs)

    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", counted)
    return calls


@pytest.mark.parametrize(
    ("precision", "jit_compile"),
    [("float32", False), ("float32", True), ("mixed_float16", False), ("mixed_bfloat16", False)],
)
def test_tiny_model_trains_as_with_keras_adam(precision, jit_compile, kernel_calls):
    keras.mixed_precision.set_global_policy(precision)
    optimizer = make_optimizer(config(learning_rate=0.01, precision=precision))
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    assert type(inner) is FusedAdam
    assert (inner is not optimizer) == (precision == "mixed_float16")
    fused = train_tiny(optimizer, jit_compile=jit_compile)
    n_trainable = len(tiny_model().trainable_weights)
    assert len(kernel_calls) >= n_trainable  # once per variable in the traced step
    reference = keras.optimizers.Adam(learning_rate=0.01)
    if precision == "mixed_float16":
        reference = keras.optimizers.LossScaleOptimizer(reference)
    expected = train_tiny(reference, jit_compile=jit_compile)
    for w, e in zip(fused, expected, strict=True):
        assert w.dtype == np.float32  # float32 variables under every policy
        np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)


def test_mirrored_strategy_on_two_replicas_matches_keras_adam():
    # Two logical CPUs must be set before TensorFlow starts: a fresh process.
    code = textwrap.dedent(
        """
        import json
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from rmib.training import FusedAdam

        calls = []
        kernel = tf.raw_ops.ResourceApplyAdam
        def counted(**kwargs):
            calls.append(1)
            return kernel(**kwargs)
        tf.raw_ops.ResourceApplyAdam = counted

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
        result = {}
        for name, adam in (("fused", FusedAdam), ("keras", keras.optimizers.Adam)):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                                          keras.layers.Dense(1, activation="sigmoid")])
                model.compile(optimizer=adam(learning_rate=0.05), loss="binary_crossentropy")
            result[name + "_start"] = [w.tolist() for w in model.get_weights()]
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            result[name] = [w.tolist() for w in model.get_weights()]
            replicas = [v.value.values for v in model.trainable_variables]
            result[name + "_replicas_agree"] = all(
                np.array_equal(a.numpy(), b.numpy()) for a, b in replicas)
            result[name + "_replicas"] = len(replicas[0])
        result["kernel_calls"] = len(calls)
        print("RESULT " + json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=200, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["fused_replicas"] == 2 and result["fused_replicas_agree"]
    assert result["keras_replicas_agree"]
    assert result["kernel_calls"] >= 2 * 4  # each of 4 variables on each replica
    # 8 steps at lr 0.05 move the weights by ~0.1; an update on the wrong replica's
    # slots, or twice, or not at all, would be off by ~lr. Keras' and the kernel's
    # roundings (~1e-7 a step), fed back through 8 steps, stay below 2e-5.
    pairs = zip(result["fused"], result["fused_start"], strict=True)
    moved = [np.max(np.abs(np.subtract(w, s))) for w, s in pairs]
    assert min(moved) > 0.02
    for w, k in zip(result["fused"], result["keras"], strict=True):
        np.testing.assert_allclose(w, k, rtol=1e-4, atol=2e-5)
    for w, k in zip(result["fused_start"], result["keras_start"], strict=True):
        np.testing.assert_array_equal(w, k)


# --------------------------------------------------------------------------- saving, resuming


def test_serialization_round_trip():
    optimizer = FusedAdam(learning_rate=2e-4, beta_2=0.99, weight_decay=0.01, clipnorm=1.0)
    config_ = keras.optimizers.serialize(optimizer)
    assert config_["registered_name"] == "rmib>FusedAdam"
    clone = keras.optimizers.deserialize(json.loads(json.dumps(config_)))
    assert type(clone) is FusedAdam
    assert clone.get_config() == optimizer.get_config()
    coupled = keras.optimizers.serialize(CoupledDecayAdam(coupled_weight_decay=5e-4))
    # Files saved before the optimizer moved out of rmib.training.callbacks still load.
    coupled["module"] = "rmib.training.callbacks"
    clone = keras.optimizers.deserialize(coupled)
    assert type(clone) is CoupledDecayAdam and clone.coupled_weight_decay == pytest.approx(5e-4)


def test_keras_file_with_fused_adam_loads_with_its_state(tmp_path):
    model = tiny_model()
    model.compile(optimizer=FusedAdam(learning_rate=0.01), loss=LOSS)
    x, y = arrays()
    model.train_on_batch(x[:8], y[:8])
    model.save(tmp_path / "tiny.keras")
    loaded = keras.saving.load_model(tmp_path / "tiny.keras")
    assert type(loaded.optimizer) is FusedAdam
    assert int(loaded.optimizer.iterations) == 1
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.train_on_batch(x[8:16], y[8:16])
    model.train_on_batch(x[8:16], y[8:16])
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_fresh_process_loads_a_keras_file_compiled_with_fused_adam(tmp_path):
    # rmib's lazy registry (rmib.registration) must find "rmib>FusedAdam" as it finds layers.
    model = tiny_model()
    model.compile(optimizer=FusedAdam(learning_rate=0.01), loss=LOSS)
    model.train_on_batch(*arrays(n=8))
    model.save(tmp_path / "tiny.keras")
    code = (
        "import rmib, keras\n"
        f"model = keras.models.load_model({str(tmp_path / 'tiny.keras')!r})\n"
        "print(type(model.optimizer).__name__, int(model.optimizer.iterations))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=200, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["FusedAdam", "1"]


@pytest.mark.parametrize(
    ("first", "second"), [(keras.optimizers.Adam, FusedAdam), (FusedAdam, keras.optimizers.Adam)]
)
def test_checkpoint_of_one_adam_resumes_in_the_other(tmp_path, first, second):
    x, y = arrays()
    batches = [(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(4)]
    keras.utils.set_random_seed(0)
    straight = tiny_model()
    straight.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    for batch in batches:
        straight.train_on_batch(*batch)

    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=first(0.01), loss=LOSS)
    for batch in batches[:2]:
        model.train_on_batch(*batch)
    model.save(tmp_path / "last.keras")
    # As rmib's resume: a fresh optimizer, built, then the checkpoint's weights and state.
    resumed = keras.saving.load_model(tmp_path / "last.keras", compile=False)
    resumed.compile(optimizer=second(0.01), loss=LOSS)
    resumed.optimizer.build(resumed.trainable_variables)

    # Same variables, same names after the optimizer's own (uniquified) name.
    def names(optimizer):
        return [v.path.split("/", 1)[1] for v in optimizer.variables]

    assert names(resumed.optimizer) == names(model.optimizer)
    assert len(names(model.optimizer)) == 2 + 2 * len(model.trainable_variables)
    assert {resumed.optimizer.name.split("_")[0], model.optimizer.name.split("_")[0]} == {"adam"}
    resumed.load_weights(tmp_path / "last.keras")
    assert int(resumed.optimizer.iterations) == 2
    for batch in batches[2:]:
        resumed.train_on_batch(*batch)
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_started_with_keras_adam_resumes_with_fused_adam(tmp_path, monkeypatch):
    # A run directory written before this change (keras Adam's moments in last.keras),
    # resumed by today's make_optimizer and, for reference, by keras Adam again.
    cfg = config(epochs=2, learning_rate=0.01)

    def keras_adam(cfg, steps_per_epoch=None):
        return keras.optimizers.Adam(cfg.learning_rate)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "make_optimizer", keras_adam)
        with pytest.raises(KeyboardInterrupt):
            run_fit(tmp_path / "fused", cfg, extra_callbacks=[InterruptAfter(0)])
    shutil.copytree(tmp_path / "fused", tmp_path / "keras")
    first = load_model(tmp_path / "keras" / "checkpoints" / "last.keras").get_weights()
    fused, history = run_fit(tmp_path / "fused", cfg, resume=True)
    assert type(fused.optimizer) is FusedAdam
    assert int(fused.optimizer.iterations) == 2 * STEPS_PER_EPOCH
    assert history["epoch"] == [1, 2]
    with monkeypatch.context() as patch:
        patch.setattr(runner, "make_optimizer", keras_adam)
        kept, _ = run_fit(tmp_path / "keras", cfg, resume=True)
    assert type(kept.optimizer) is keras.optimizers.Adam
    for a, b in zip(fused.get_weights(), kept.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The epoch resumed changed the weights (the comparison above compares something).
    assert np.max(np.abs(first[0] - kept.get_weights()[0])) > 1e-3


def test_make_optimizer_gives_fused_adam():
    assert type(make_optimizer(TrainConfig())) is FusedAdam
    coupled = make_optimizer(TrainConfig(weight_decay=1e-4, weight_decay_mode="coupled"))
    assert type(coupled) is CoupledDecayAdam
    decoupled = make_optimizer(TrainConfig(weight_decay=1e-4))
    assert type(decoupled) is FusedAdam and decoupled.weight_decay == pytest.approx(1e-4)
    assert optimizers.FusedAdam is FusedAdam
