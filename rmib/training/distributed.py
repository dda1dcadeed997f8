"""`fit`'s training loop under MultiWorkerMirroredStrategy, through `strategy.run`.

Keras 3's own `model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); `distributed_fit` runs the compiled model's
`train_step` on every replica instead, with the same callbacks and logs.
The helpers `is_arrays` and `steps_of` tell the training data's form and
length to both loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import tensorflow as tf

from rmib.config import TrainConfig
from rmib.errors import RmibError
from rmib.training.devices import distribute_dataset


def is_arrays(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) in (2, 3) and hasattr(data[0], "shape")


def steps_of(data, batch_size: int) -> int | None:
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        return cardinality if cardinality > 0 else None
    if is_arrays(data):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data) or None
    except TypeError:
        return None


def _metrics_in_scope(metrics):
    """Fresh copies (from their configs) of the metric objects in `metrics`."""
    if isinstance(metrics, keras.metrics.Metric):
        return type(metrics).from_config(metrics.get_config())
    if isinstance(metrics, dict):
        return {k: _metrics_in_scope(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(_metrics_in_scope(m) for m in metrics)
    return metrics  # names and functions: Keras builds them in the scope


def _as_dataset(data, batch_size: int) -> tf.data.Dataset:
    if isinstance(data, tf.data.Dataset):
        return data
    if is_arrays(data):
        return tf.data.Dataset.from_tensor_slices(tuple(data)).batch(batch_size)
    raise RmibError("strategy multiworker needs a tf.data.Dataset or arrays as training data")


def distributed_fit(
    model,
    strategy,
    train_data,
    val_data,
    *,
    cfg: TrainConfig,
    batch_size: int,
    initial_epoch: int,
    steps_per_epoch,
    validation_steps,
    class_weight,
    callbacks,
    verbose,
) -> None:
    """`model.fit` for MultiWorkerMirroredStrategy, where Keras 3's own fit fails
    (keras-team/keras#20585): each step runs the compiled model's `train_step`
    through `strategy.run` (the optimizer all-reduces the gradients), and the
    same callbacks see the same logs as under `model.fit`. At the end of every
    epoch, before validation and the callbacks, the moving statistics of the
    batch-norm layers are averaged over the replicas
    (`_average_batch_norm_statistics`), so every worker validates and saves
    the same model.

    Every worker must run the same number of steps, so the steps per epoch must
    be known (given, or the dataset's cardinality). Arrays are batched in order,
    without shuffling.
    """
    if class_weight:
        raise RmibError(
            "class weights are not supported with strategy multiworker; turn class_weights off"
        )
    train = _as_dataset(train_data, batch_size)
    steps = steps_per_epoch or steps_of(train, batch_size)
    if not steps:
        raise RmibError(
            "strategy multiworker needs the number of steps per epoch (set steps_per_epoch): "
            "every worker must run the same number of steps"
        )
    # As model.fit does: build the compiled metrics in the strategy's scope now;
    # built lazily inside strategy.run, their variables would stay per worker.
    with strategy.scope():
        model._symbolic_build(data_batch=next(iter(train)))
    train_batches = distribute_dataset(strategy, train)
    val_batches = None
    if val_data is not None:
        val = _as_dataset(val_data, batch_size)
        if validation_steps:
            val = val.take(validation_steps)
        val_batches = distribute_dataset(strategy, val)

    def reduced(logs):
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

    @tf.function
    def train_step(iterator):
        return reduced(strategy.run(model.train_step, args=(next(iterator),)))

    @tf.function
    def test_step(batch):
        strategy.run(model.test_step, args=(batch,))

    @tf.function
    def metrics_result():
        # Metric variables sync on read: read here, across replicas, they hold the
        # sums over every worker, so AUC, RMSE ... are those of the global data
        # (a mean of per-worker results would not be).
        return model.get_metrics_result()

    def epoch_metrics(prefix=""):
        with strategy.scope():
            return {f"{prefix}{k}": float(v) for k, v in metrics_result().items()}

    average_statistics = _average_batch_norm_statistics(model, strategy)

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=False,
        add_progbar=bool(verbose),
        model=model,
        verbose=verbose,
        epochs=cfg.epochs,
        steps=steps,
    )
    model.stop_training = False
    # With explicit steps the dataset runs on across epochs (rmib's seeded
    # pipelines hold every epoch back to back); else each epoch is one pass.
    iterator = iter(train_batches) if steps_per_epoch else None
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, cfg.epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        epoch_iterator = iterator if iterator is not None else iter(train_batches)
        logs = {}
        for step in range(steps):
            callback_list.on_train_batch_begin(step)
            logs = train_step(epoch_iterator)
            callback_list.on_train_batch_end(step, logs)
        average_statistics()
        epoch_logs = epoch_metrics()
        if val_batches is not None:
            model.reset_metrics()
            for batch in val_batches:
                test_step(batch)
            epoch_logs.update(epoch_metrics("val_"))
        callback_list.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callback_list.on_train_end()


def _batch_norm_statistics(model) -> list:
    """The moving mean and variance of every batch-norm layer of `model` that trains."""
    statistics = []
    # Keras' own walk over nested layers (models, and layers inside custom layers).
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and layer.built:
            statistics += [layer.moving_mean, layer.moving_variance]
    return statistics


def _average_batch_norm_statistics(model, strategy) -> Callable[[], None]:
    """A function that sets every replica's batch-norm moving statistics to their mean.

    Keras 3 creates them with aggregation "none", so under
    MultiWorkerMirroredStrategy each worker updates its own copy from its own
    shard of every batch. The moving updates are linear, so averaging the
    copies at every epoch end gives what one copy fed the replicas' mean batch
    statistics would hold, as tf.keras 2's batch norm (variables synchronized
    on read with MEAN) did. Frozen layers keep their statistics and are left out.
    """
    statistics = _batch_norm_statistics(model)
    if not statistics:
        return lambda: None

    def replace_by_mean():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce("MEAN", [tf.identity(v.value) for v in statistics])
        for variable, mean in zip(statistics, means, strict=True):
            variable.assign(mean)  # aggregation "none": each replica sets its own copy

    @tf.function
    def average():
        strategy.run(replace_by_mean)

    return average
