"""Training on several machines: two worker processes on 127.0.0.1 train one model.

Each worker is a real process with its own TF_CONFIG (free ports picked at
run time, CPU only); together they must see disjoint halves of every global
batch, end with identical weights, and match a single process trained on
the same global batches: `batch_size` is per replica, so 2 per worker x 2
workers against 4 in the single process.
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from rmib.errors import RmibError
from rmib.training.local_cluster import local_cluster, run_workers, worker_environment

pytestmark = pytest.mark.timeout(600)

WORKER_TIMEOUT = 300  # seconds for the three processes together

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from rmib import training  # creates no TF op: the strategy comes first

    run_dir, result_path, mode = sys.argv[1:4]
    strategy = training.get_strategy("multiworker" if mode == "multi" else "default")

    import keras
    import tensorflow as tf
    from rmib.config import TrainConfig

    N = 16
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.1).astype("float32")
    cfg = TrainConfig(
        epochs=3, batch_size=2 if mode == "multi" else 4, optimizer="sgd", momentum=0.0,
        learning_rate=0.05, monitor="loss", precision="float32",
        strategy="multiworker" if mode == "multi" else "default", seed=0,
        tensorboard=False, restore_best=False,
    )
    global_batch = training.global_batch_size(cfg)

    seen, local_batches = [], []  # the example indices this worker's replica receives
    indices = tf.data.Dataset.range(N).batch(global_batch)
    for batch in training.distribute_dataset(strategy, indices):
        for local in strategy.experimental_local_results(batch):
            seen += [int(i) for i in local.numpy()]
            local_batches.append(len(local))

    def make_model():
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(4, activation="tanh")(inputs)
        return keras.Model(inputs, keras.layers.Dense(1)(hidden))

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    # RMSE over the epoch, sqrt(sum / count), is not a mean of per-worker values.
    model, history = training.fit(
        make_model, data, (x[:6], y[:6]), config=cfg, run_dir=run_dir, loss="mse",
        metrics=[keras.metrics.RootMeanSquaredError(name="rmse")], verbose=0,
    )
    with open(result_path, "w") as f:
        json.dump({
            "replicas": strategy.num_replicas_in_sync,
            "chief": training.is_chief(strategy),
            "seen": seen,
            "global_batch": global_batch,
            "local_batches": local_batches,
            "history": {k: history[k] for k in ("loss", "rmse", "val_loss", "val_rmse")},
            "weights": [w.tolist() for w in model.get_weights()],
        }, f)
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """({worker index: result}, single-process result)."""
    tmp = tmp_path_factory.mktemp("multiworker")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    # Two workers of one cluster and the single process, all at once.
    runs = [(tmp / "run", tmp / f"w{i}.json", "multi") for i in range(2)]
    runs.append((tmp / "single", tmp / "single.json", "single"))
    commands = [[sys.executable, str(script), str(d), str(r), mode] for d, r, mode in runs]
    environments = [worker_environment(c) for c in local_cluster(2)] + [worker_environment()]
    logs = [tmp / f"log{i}.txt" for i in range(len(commands))]
    run_workers(commands, environments, logs, WORKER_TIMEOUT)
    loaded = {i: json.loads((tmp / f"w{i}.json").read_text()) for i in range(2)}
    return loaded, json.loads((tmp / "single.json").read_text()), tmp


def test_two_workers_form_one_cluster(results):
    workers, single, _ = results
    assert [workers[i]["replicas"] for i in (0, 1)] == [2, 2]
    assert single["replicas"] == 1
    assert [workers[i]["chief"] for i in (0, 1)] == [True, False]


def test_batch_size_is_per_replica(results):
    workers, single, _ = results
    # --batch-size 2 on each of 2 workers: global batches of 4, as --batch-size 4 alone.
    assert [workers[i]["global_batch"] for i in (0, 1)] == [4, 4] == [single["global_batch"]] * 2
    assert workers[0]["local_batches"] == workers[1]["local_batches"] == [2] * 4
    assert single["local_batches"] == [4] * 4


def test_workers_see_disjoint_shards_covering_the_data(results):
    workers, _, _ = results
    first, second = set(workers[0]["seen"]), set(workers[1]["seen"])
    assert len(workers[0]["seen"]) == len(first) == 8
    assert not first & second
    assert first | second == set(range(16))


def test_workers_end_with_identical_weights_equal_to_one_process(results):
    workers, single, _ = results
    for a, b in zip(workers[0]["weights"], workers[1]["weights"], strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    for a, b in zip(workers[0]["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-5)
    # Logged values are those of the global batches, validation included.
    for key, values in single["history"].items():
        np.testing.assert_allclose(workers[0]["history"][key], values, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(workers[1]["history"][key], values, rtol=1e-5, err_msg=key)
    # Training did something: the loss fell.
    assert single["history"]["loss"][-1] < single["history"]["loss"][0]


def test_only_the_chief_writes_the_run(results):
    _, _, tmp = results
    run = tmp / "run"
    assert (run / "model.keras").is_file() and (run / "history.csv").is_file()
    assert (run / "workers" / "worker_1" / "model.keras").is_file()


def test_multiworker_without_tf_config_is_a_clear_error(monkeypatch):
    from rmib.training import devices

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RmibError, match="TF_CONFIG"):
        devices._multiworker_strategy()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(RmibError, match="TF_CONFIG"):
        devices._multiworker_strategy()


def test_tpu_without_a_tpu_is_a_clear_error(monkeypatch):
    from rmib.training import devices

    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(RmibError, match="no TPU found"):
        devices._tpu_strategy()


def test_strategy_names_are_shared_by_config_cli_and_runner():
    from rmib.cli.models import pretrain
    from rmib.config import STRATEGIES
    from rmib.training import devices

    assert set(STRATEGIES) == {"auto", *devices._STRATEGY_BUILDERS}
    choice = next(p for p in pretrain.params if p.name == "strategy").type
    assert tuple(choice.choices) == STRATEGIES
