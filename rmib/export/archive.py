"""The pieces every export shares: the metadata, the SavedModel archive, the files written.

A method declares its serving signatures in an `Exporter` (in
`rmib/methods/<method>/export.py`); this module turns one into a
`keras.export.ExportArchive` with the ``metadata`` signature and
``assets/rmib.json``, converts its batch signature to TFLite, and writes a
SavedModel folder, a `.keras` copy or a `.tflite` file atomically (a failed
or interrupted export leaves no trace), checked with `rmib.export.checks`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from rmib import __version__, io, training
from rmib.choices import EXPORT_FORMATS
from rmib.data.pipeline import Preprocessing
from rmib.errors import RmibError
from rmib.export import checks
from rmib.inference.segmenter import compiled_predict

CHECK_TOLERANCE = 1e-4
EXPORT_FORMAT_VERSION = 2
METADATA_ASSET = "rmib.json"
DEFAULT_THRESHOLD = 0.5

PREPROCESSING_METHODS = (
    "method: 'clahe' = OpenCV CLAHE clip 1.5, 8x8 tiles on the LAB L channel; 'graham' = "
    "4 I - 4 GaussianBlur(I, sigma 10 * max(H, W) / 800) + 128; 'none'"
)
CALLER_PREPROCESSING = (
    "segment_image takes the photograph after the preprocessing named in 'preprocessing' "
    "(if centre_crop and the photograph is at least 2816 x 3328: its centre 2816 x 3328, "
    "then the field-of-view mask of that photograph, then "
    f"{PREPROCESSING_METHODS}), "
    "as uint8 RGB, and the field-of-view mask as uint8 0/1 (or shape (0, 0) for none); "
    "see README 'Serving a SavedModel'. classify takes the photograph after the whole "
    "preprocessing (field-of-view crop, resize with centred padding to size x size, method) "
    "as float32 in [0, 255]."
)
FOV_CROP_PREPROCESSING = (
    "segment_image takes the photograph after the preprocessing named in 'preprocessing' "
    "(if centre_crop and the photograph is at least 2816 x 3328: its centre 2816 x 3328; "
    "then its field-of-view mask; if fov_crop: the photograph and the mask cropped to the "
    "mask's bounding box (the rows and columns holding a field-of-view pixel), the output "
    f"belonging to that box; then {PREPROCESSING_METHODS}), "
    "as uint8 RGB, and the field-of-view mask as uint8 0/1 (or shape (0, 0) for none); "
    "see README 'Serving a SavedModel'."
)


def spec(dtype: str, shape: list, description: str) -> dict:
    """One input or output of a signature, as the metadata documents it."""
    return {"dtype": dtype, "shape": shape, "description": description}


class Exporter:
    """How one kind of run exports: the serving signatures a method declares.

    A method's `rmib.tasks.Method.export` returns one for a run's metadata;
    `rmib.export.export_run` loads the model with it, asks it for the export
    metadata and the endpoints, and checks the export with its sample cases.

    Attributes:
        kind: the export's "kind" in its metadata ("classifier", "tiled", ...).
        batch_signature: the signature over a batch, the one a TFLite file holds.
        tiles: whether ``segment_image`` tiles (the run takes --tile and --overlap).
        description: what --tile's refusal calls the model ("a classifier").
    """

    kind = ""
    batch_signature = ""
    tiles = False
    description = "this model"

    def refuse(self, model_path, format: str) -> None:
        """Raise `RmibError` if the run at `model_path` has no export in `format`."""

    def load(self, model_path, unsafe: bool):
        """The model the endpoints serve (default the Keras model of the run or file)."""
        return training.load_model(model_path, unsafe=unsafe)

    def networks(self, model) -> list:
        """The Keras models of what `load` returned (set to the export's precision)."""
        return [model]

    def tiling(self, model, run_metadata: dict, tile, overlap, batch_size) -> tuple:
        """(tile, overlap, batch size) of ``segment_image``, or Nones when it does not tile."""
        return None, None, None

    def metadata(self, run_metadata: dict, preprocessing: dict, tiling: tuple) -> dict:
        """The kind's fields of the export metadata (threshold, sizes, tiling ...)."""
        raise NotImplementedError

    def signature_docs(self, metadata: dict) -> dict:
        """Names, dtypes, shapes and meaning of every input and output of the signatures."""
        raise NotImplementedError

    def caller_preprocessing(self, preprocessing: dict) -> str:
        """What the caller does to a photograph before the signatures take it."""
        return CALLER_PREPROCESSING

    def add_endpoints(self, archive, model, metadata: dict, patch_size=None) -> list:
        """Add the serving signatures to `archive`; returns their names."""
        raise NotImplementedError

    def batch_cases(self, model, metadata: dict, patch_size=None, seed: int = 0) -> list:
        """`rmib.export.checks.Case`s: random batch-signature inputs and the model's outputs."""
        raise NotImplementedError

    def image_case(self, model, metadata: dict):
        """The whole-image signature's `Case` on a synthetic photograph, or None."""
        return None


@dataclasses.dataclass
class ExportResult:
    """What `rmib.export_model` wrote.

    Attributes:
        path: the export (a SavedModel folder, a `.keras` or a `.tflite` file).
        format: "savedmodel", "keras" or "tflite".
        signatures: names of the serving signatures (empty for "keras").
        differences: signature -> max abs difference from rmib's own
            prediction, filled by `check=True`.
        metadata: the export metadata (what `assets/rmib.json` holds).
        precision: the policy the export computes in ("float32" by default).
        tolerance: the largest difference the check accepts
            (`rmib.training.devices.check_tolerance` of `precision`).
    """

    path: Path
    format: str
    signatures: list
    differences: dict
    metadata: dict
    precision: str = "float32"
    tolerance: float = CHECK_TOLERANCE


def export_metadata(
    exporter: Exporter, run_metadata: dict, tiling=(None, None, None), precision="float32"
) -> dict:
    """The metadata stored with an export: what the caller must know to feed it.

    Args:
        exporter: the run's `Exporter`.
        run_metadata: the run's rmib.json dict.
        tiling: (tile, overlap, batch size) of ``segment_image`` (kinds that tile).
        precision: the policy the exported graph computes in.

    Returns:
        A JSON-serialisable dict: kind, task, preprocessing, what the kind
        needs (lesion, threshold, tiling, sizes, grid), the signatures' inputs
        and outputs, the caller's preprocessing and the run's metadata.
    """
    preprocessing = Preprocessing.from_dict(run_metadata.get("preprocessing")).to_dict()
    meta = {
        "format": "rmib-savedmodel",
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": exporter.kind,
        "task": run_metadata.get("task"),
        "preprocessing": preprocessing,
        "precision": precision,
        "trained_precision": run_metadata.get("precision"),
    }
    meta.update(exporter.metadata(run_metadata, preprocessing, tuple(tiling)))
    meta["signatures"] = exporter.signature_docs(meta)
    meta["caller_preprocessing"] = exporter.caller_preprocessing(preprocessing)
    meta["rmib_version"] = __version__
    meta["run"] = run_metadata
    return meta


def probability(model, batch):
    """The model's probability output, float32, whatever structure it returns.

    Runs the model in a `tf.function`, as `rmib predict` does: under a mixed
    policy, eager execution rounds after every op while a graph fuses ops
    (e.g. convolution, bias and ReLU in one oneDNN kernel), and the two differ
    by up to 0.06 in probability on a bfloat16 encoder-decoder (issue 15); the
    SavedModel runs the same graph as rmib's own prediction, bit for bit.
    """
    if tf.executing_eagerly():
        return compiled_predict(model, int(batch.shape[-1]))(tf.cast(batch, tf.float32))
    # Inside a signature being traced: the model joins that graph.
    return compiled_predict(model, int(batch.shape[-1])).python_function(batch)


def build_export_archive(exporter: Exporter, model, metadata: dict, patch_size=None):
    """A `keras.export.ExportArchive` with the exporter's signatures and ``metadata``.

    Args:
        exporter: the run's `Exporter`.
        model: what `exporter.load` returned.
        metadata: what `export_metadata` returned.
        patch_size: fix the tile side of ``segment_patch`` (TFLite needs
            static channel counts, which unknown tile sides hide); None: any.

    Returns:
        (archive, names of the signatures).
    """
    # No archive.track(model): the endpoints track every variable they use,
    # and tracking the model as well saves each weight twice (Keras 3.15
    # stores the Keras variables beside the tf.Variables the endpoints hold).
    archive = keras.export.ExportArchive()
    names = exporter.add_endpoints(archive, model, metadata, patch_size)
    metadata_json = json.dumps(metadata, indent=2, default=str)

    def metadata_fn():
        return {"json": tf.constant(metadata_json)}

    archive.add_endpoint("metadata", metadata_fn, input_signature=[])
    return archive, names


def write_savedmodel(folder: Path, exporter: Exporter, model, metadata: dict, patch_size=None):
    """Write the SavedModel and ``assets/rmib.json`` into `folder`; returns the signatures."""
    archive, names = build_export_archive(exporter, model, metadata, patch_size)
    archive.write_out(str(folder), verbose=False)
    assets = Path(folder) / "assets"
    assets.mkdir(exist_ok=True)
    (assets / METADATA_ASSET).write_text(
        json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8"
    )
    return names


def convert_tflite(savedmodel: Path, signature: str) -> bytes:
    """One signature of a SavedModel as a TFLite flat buffer.

    Raises:
        RmibError: the conversion failed (naming the unsupported ops).
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel), [signature])
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises ConverterError and friends
        text = str(exc)
        ops = sorted(set(_unsupported_ops(text)))
        which = f"unsupported op(s): {', '.join(ops)}" if ops else text.strip().splitlines()[0]
        raise RmibError(
            f"TFLite conversion of the {signature!r} signature failed: {which}"
        ) from None


def _unsupported_ops(text: str):
    for match in re.finditer(r"'(tf\.[A-Za-z0-9_]+|tfl\.[A-Za-z0-9_]+)' op", text):
        yield match.group(1)


def write_export(
    out: Path, format: str, exporter: Exporter, model, metadata: dict, model_path, *, check, unsafe
) -> tuple[list, dict]:
    """Write the export of `format` at `out` atomically, checked if asked.

    Args:
        out: the SavedModel folder, `.keras` or `.tflite` file.
        format: one of `EXPORT_FORMATS`.
        exporter, model, metadata: the run's `Exporter`, its loaded model and
            the export metadata.
        model_path: the run directory or `.keras` file (copied for "keras").
        check: compare the export with rmib's own prediction before it is moved in place.
        unsafe: allow Lambda layers when the check reloads a `.keras` copy.

    Returns:
        (names of the signatures, signature -> max abs difference).
    """
    differences = {}
    if format == "savedmodel":
        with io.atomic_directory(out) as folder:
            names = write_savedmodel(folder, exporter, model, metadata)
            if check:
                differences = checks.check_savedmodel(folder, exporter, model, metadata)
    elif format == "keras":
        source = Path(model_path)
        if source.is_dir():
            source = training.RunDirectory(source, create=False).model_path
        names = []
        with io.atomic_path(out) as tmp:
            shutil.copyfile(source, tmp)
            if check:
                differences = checks.check_keras(tmp, exporter, model, metadata, unsafe=unsafe)
    else:
        signature = exporter.batch_signature
        names = [signature]
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".rmib-export-", dir=out.parent) as scratch:
            savedmodel = Path(scratch) / "savedmodel"
            # TFLite wants static channel counts: fix the tile side of segment_patch.
            write_savedmodel(savedmodel, exporter, model, metadata, metadata.get("tile"))
            flat = convert_tflite(savedmodel, signature)
            with io.atomic_path(out) as tmp:
                tmp.write_bytes(flat)
                if check:
                    differences = checks.check_tflite(tmp, exporter, model, metadata)
    return names, differences


__all__ = [
    "CALLER_PREPROCESSING",
    "CHECK_TOLERANCE",
    "DEFAULT_THRESHOLD",
    "EXPORT_FORMATS",
    "FOV_CROP_PREPROCESSING",
    "PREPROCESSING_METHODS",
    "ExportResult",
    "Exporter",
    "build_export_archive",
    "convert_tflite",
    "export_metadata",
    "probability",
    "spec",
    "write_export",
    "write_savedmodel",
]
