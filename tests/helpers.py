"""Checks every test package shares (import as `from tests.helpers import run_model_checks`).

`run_model_checks` is the one build -> call -> save -> reload check of an rmib
model, in the style of keras-hub's `run_backbone_test`: each model family's
tests call it instead of writing their own `.keras` round trip.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np


@dataclasses.dataclass
class ModelChecks:
    """What `run_model_checks` built, computed and reloaded (for further checks)."""

    model: keras.Model
    outputs: object  # NumPy arrays, in the structure the model returns
    loaded: keras.Model
    path: Path


def _numpy(structure):
    return keras.tree.map_structure(lambda t: keras.ops.convert_to_numpy(t), structure)


def _as_json(config):
    """A config as the `.keras` file stores it (tuples and lists are both JSON arrays)."""
    return json.loads(json.dumps(config, sort_keys=True, default=repr))


def _shapes(structure):
    """The shape tuples of a structure of arrays, in the same structure (lists for sequences)."""
    if isinstance(structure, dict):
        return {key: _shapes(value) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return [_shapes(value) for value in structure]
    return tuple(structure.shape)


def run_model_checks(
    build: Callable[[], keras.Model] | keras.Model,
    inputs,
    directory: Path,
    *,
    output_shape=None,
    output_dtype: str | None = "float32",
    atol: float = 0.0,
    rtol: float = 0.0,
) -> ModelChecks:
    """Build, call, save to a `.keras` file, reload: the reloaded model is the same model.

    Args:
        build: a callable returning a fresh model, or a model already built.
        inputs: one batch the model accepts (array or dict of arrays).
        directory: where the `.keras` file goes (a test's `tmp_path`).
        output_shape: the expected output shape (a tuple, or a structure of
            tuples matching the outputs), or None not to check it.
        output_dtype: the expected dtype of every output, or None.
        atol, rtol: tolerance between the model's and the reloaded model's
            outputs; the default asks for identical outputs.

    Checks: a forward pass gives finite outputs of the expected shape and
    dtype; `model.save` writes a `.keras` file that `keras.models.load_model`
    reloads as the same class, with the same weight paths and trainable
    weights, the same config, and the same outputs on `inputs`.
    """
    model = build if isinstance(build, keras.Model) else build()
    assert isinstance(model, keras.Model), type(model)
    outputs = _numpy(model(inputs, training=False))
    flat = keras.tree.flatten(outputs)
    assert flat, "the model returned no output"
    for array in flat:
        assert np.all(np.isfinite(array)), "non-finite output"
        if output_dtype is not None:
            assert keras.backend.standardize_dtype(array.dtype) == output_dtype, array.dtype
    if output_shape is not None:
        assert _shapes(outputs) == output_shape, (_shapes(outputs), output_shape)

    path = Path(directory) / f"{model.name}.keras"
    model.save(path)
    assert path.is_file() and path.stat().st_size > 0
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    assert [w.path for w in loaded.trainable_weights] == [w.path for w in model.trainable_weights]
    for got, want in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=want.path)
    assert _as_json(loaded.get_config()) == _as_json(model.get_config())
    reloaded = _numpy(loaded(inputs, training=False))
    keras.tree.assert_same_structure(reloaded, outputs)
    for got, want in zip(keras.tree.flatten(reloaded), flat, strict=True):
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    return ModelChecks(model, outputs, loaded, path)
