"""`rmib export --check`: the export reloaded and compared with rmib's own prediction.

Each method's `rmib.export.archive.Exporter` says what to compare: its
`batch_cases` (random inputs of the batch signatures and the Keras model's
outputs) and its `image_case` (a synthetic photograph through the run's
preprocessing and what `rmib predict` / `rmib grade predict` give for it).
This module runs them on a SavedModel, a TFLite file or a `.keras` copy and
refuses a difference of the precision's tolerance or more.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import tensorflow as tf

from rmib import training
from rmib.data import synthetic
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.errors import RmibError
from rmib.training import devices as precisions


@dataclasses.dataclass
class Case:
    """One call of a signature on sample inputs and what rmib's Python code gives for it.

    Attributes:
        signature: the signature's name.
        inputs: its inputs by name (NumPy arrays).
        expected: outputs by name; float outputs are compared within the tolerance.
        argmax: integer outputs (e.g. "grade") -> the expected probabilities
            they are the argmax of: they must agree, but at near ties.
        thresholded: 0/1 outputs (e.g. "mask") -> the expected probability
            they threshold at the metadata's "threshold": they must agree, but
            where the probability is within the tolerance of it.
    """

    signature: str
    inputs: dict
    expected: dict
    argmax: dict = dataclasses.field(default_factory=dict)
    thresholded: dict = dataclasses.field(default_factory=dict)


def sample_photograph(preprocessing: dict, shape, seed: int = 0):
    """A synthetic photograph of `shape`, preprocessed without the centre crop: (image, fov)."""
    photograph, _, _ = synthetic.synthesize_fundus(shape, seed=seed)
    prep = dataclasses.replace(Preprocessing.from_dict(preprocessing), centre_crop=False)
    image, _, fov = preprocess_array(photograph, prep)
    return image, fov


def tolerance(metadata: dict) -> float:
    """The largest difference the check accepts for the export's precision."""
    return precisions.check_tolerance(metadata.get("precision", "float32"))


def _max_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise RmibError(f"export check: output shape {a.shape} differs from the model's {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare(path, case: Case, served: dict, metadata: dict) -> float:
    """Max abs difference of the float outputs; the integer ones must agree (but at near ties)."""
    limit = tolerance(metadata)
    difference = 0.0
    for name, expected in case.expected.items():
        got = np.asarray(served[name])
        if name in case.argmax:
            probs = np.sort(np.asarray(case.expected[case.argmax[name]]))
            if int(got) != int(expected) and probs[-1] - probs[-2] >= limit:
                raise RmibError(f"export check failed: {path}: {case.signature} {name} differs")
            continue
        difference = max(difference, _max_difference(got, expected))
    for name, probability in case.thresholded.items():
        expected = case.expected[probability]
        mask = (expected >= metadata["threshold"]).astype(np.uint8)
        near = np.abs(expected - metadata["threshold"]) < limit
        if np.any((np.asarray(served[name]) != mask) & ~near):
            raise RmibError(f"export check failed: {path}: {case.signature} {name} differs")
    return difference


def check_savedmodel(path, exporter, model, metadata: dict) -> dict:
    """Reload a SavedModel with `tf.saved_model.load`; compare it with rmib's own prediction.

    The batch signatures get random inputs and are compared with the Keras
    models; the whole-image signature (``segment_image``, ``grade_image``) gets
    a synthetic photograph through the run's preprocessing and is compared
    with what rmib's Python code gives (`exporter.image_case`); the
    `metadata` signature with `metadata`.

    Args:
        path: the SavedModel folder.
        exporter: the run's `rmib.export.archive.Exporter`.
        model: what `exporter.load` returned.
        metadata: what `rmib.export.archive.export_metadata` returned.

    Returns:
        signature -> max abs difference on the sample inputs.

    Raises:
        RmibError: a difference of the tolerance or more, a different mask
            or grade, or metadata that does not read back.
    """
    cases = exporter.batch_cases(model, metadata)
    image_case = exporter.image_case(model, metadata)
    if image_case is not None:
        cases.append(image_case)
    loaded = tf.saved_model.load(str(path))
    differences = {}
    for case in cases:
        served = loaded.signatures[case.signature](
            **{name: tf.constant(value) for name, value in case.inputs.items()}
        )
        served = {name: value.numpy() for name, value in served.items()}
        differences[case.signature] = compare(path, case, served, metadata)
    stored = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode("utf-8"))
    if stored != json.loads(json.dumps(metadata, default=str)):
        raise RmibError(f"export check failed: {path}: the stored metadata does not read back")
    raise_if_different(path, differences, metadata)
    return differences


def check_tflite(path, exporter, model, metadata: dict) -> dict:
    """Run a `.tflite` export with the TFLite interpreter; compare it with the Keras model."""
    key = exporter.batch_signature
    cases = exporter.batch_cases(model, metadata, metadata.get("tile"))
    (case,) = [c for c in cases if c.signature == key]
    with warnings.catch_warnings():  # tf.lite.Interpreter's move to ai_edge_litert
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(key)
    served = runner(**case.inputs)
    differences = {key: compare(path, case, served, metadata)}
    raise_if_different(path, differences, metadata)
    return differences


def check_keras(path, exporter, model, metadata: dict, unsafe: bool = False) -> dict:
    """Reload a copied `.keras` file and compare its batch cases with the original model's."""
    copy = training.load_model(path, unsafe=unsafe)
    differences = {}
    cases = exporter.batch_cases(model, metadata)
    for case, served in zip(cases, exporter.batch_cases(copy, metadata), strict=True):
        differences[case.signature] = compare(path, case, served.expected, metadata)
    raise_if_different(path, differences, metadata)
    return differences


def raise_if_different(path, differences: dict, metadata: dict) -> None:
    """Refuse an export whose difference from rmib's own prediction reaches the tolerance."""
    limit = tolerance(metadata)
    bad = {k: v for k, v in differences.items() if not v < limit}
    if bad:
        text = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
        raise RmibError(
            f"export check failed: {path}: max abs difference from rmib's own prediction {text} "
            f"(tolerance {limit:g} for {metadata.get('precision', 'float32')}); "
            "the export was not written"
        )


__all__ = [
    "Case",
    "check_keras",
    "check_savedmodel",
    "check_tflite",
    "compare",
    "raise_if_different",
    "sample_photograph",
    "tolerance",
]
