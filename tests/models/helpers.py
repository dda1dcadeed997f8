"""The boring, important checks every rmib layer and model gets (cf. keras-hub's TestCase).

Use from a test module in this package: `from .helpers import fit_one_step, ...`; the
`.keras` round trip every model family shares is `tests.helpers.run_model_checks`.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np


def assert_config_round_trip(layer):
    """`from_config(get_config())` rebuilds a layer with the same config."""
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    return clone


def assert_output(model, inputs, shape, dtype="float32"):
    """One forward pass gives the expected shape and dtype; returns it as NumPy."""
    outputs = model(inputs, training=False)
    assert tuple(outputs.shape) == tuple(shape)
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    return keras.ops.convert_to_numpy(outputs)


def fit_one_step(model, x, y, loss="binary_crossentropy", run_eagerly=False):
    """Compile, take one `fit` step: the loss is finite and every trainable kernel moves.

    Vectors are not all required to move: the bias of a conv followed by a batch norm
    in training mode has an exactly zero gradient (the batch mean cancels it), so it
    moves only by rounding noise. Most of them must move, though. CBAM's attention
    logits start from zero kernels (a near-identity gate), so on the first step the
    hidden MLP kernel behind a still-zero output kernel has an exactly zero gradient;
    the output kernel must move instead.
    Returns the loss of that step.
    """
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, run_eagerly=run_eagerly)
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    value = history.history["loss"][0]
    assert np.isfinite(value)
    still = [
        w
        for b, w in zip(before, model.trainable_weights, strict=True)
        if np.array_equal(b, np.array(w))
    ]
    behind_zero_gate = {
        w.path.replace("mlp_output", "mlp_hidden")
        for b, w in zip(before, model.trainable_weights, strict=True)
        if "mlp_output/kernel" in w.path and not b.any()
    }
    assert not [w.path for w in still if len(w.shape) >= 2 and w.path not in behind_zero_gate]
    assert len(still) <= len(before) // 2, [w.path for w in still]
    return value


def weights_by_path(model):
    """{variable path: NumPy copy} of every weight of `model`."""
    return {w.path: np.array(w) for w in model.weights}


@contextlib.contextmanager
def dtype_policy(name):
    """Run a block under a global Keras dtype policy, restoring the old one after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
