"""`rmib export`: a trained model as a TensorFlow SavedModel, a `.keras` file or TFLite.

The SavedModel (written with Keras 3 `keras.export.ExportArchive`) needs
neither rmib nor Keras to serve: TensorFlow alone loads it. Its named
signatures:

- classifiers: ``classify(images)``, a batch of preprocessed photographs
  float32 in [0, 255], (None, S, S, 3) -> ``{"probability": (None, 1)}``.
- segmenters: ``segment_patch(tiles)``, float32 in [0, 255], (None, h, w, 3)
  with h, w multiples of ``size_multiple`` -> ``{"probability": (None, h, w, 1)}``;
  and ``segment_image(image, fov)``, one whole preprocessed photograph uint8
  (H, W, 3) of any size and its field-of-view mask uint8 (H, W) (shape (0, 0)
  for no masking) -> ``{"probability": (H, W) float32, "mask": (H, W) uint8}``.
  Tiling, Gaussian blending and field-of-view masking run inside the graph,
  exactly as `rmib.inference.predict_tiled` does them.
- both: ``metadata()`` -> ``{"json": string}``, the same JSON as ``assets/rmib.json``.

CLAHE and the field-of-view detection have no TensorFlow ops, so
``segment_image`` takes the photograph *after* the preprocessing the metadata
names, with its field-of-view mask; README "Serving a SavedModel" has the short
OpenCV function that does both. Keeping them outside the graph keeps the
export faithful: an approximate in-graph CLAHE would silently change the
model's input.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from rmib import io
from rmib.errors import RmibError

EXPORT_FORMATS = ("savedmodel", "keras", "tflite")
CHECK_TOLERANCE = 1e-4
EXPORT_FORMAT_VERSION = 1
METADATA_ASSET = "rmib.json"
DEFAULT_OVERLAP = 0.125
DEFAULT_TILE_BATCH = 2
DEFAULT_THRESHOLD = 0.5
TILED_MODEL_TYPES = ("encoder-decoder",)

CALLER_PREPROCESSING = (
    "segment_image takes the photograph after the preprocessing named in 'preprocessing' "
    "(if centre_crop and the photograph is at least 2816 x 3328: its centre 2816 x 3328, "
    "then the field-of-view mask of that photograph, then "
    "method: 'clahe' = OpenCV CLAHE clip 1.5, 8x8 tiles on the LAB L channel; 'graham' = "
    "4 I - 4 GaussianBlur(I, sigma 10 * max(H, W) / 800) + 128; 'none'), "
    "as uint8 RGB, and the field-of-view mask as uint8 0/1 (or shape (0, 0) for none); "
    "see README 'Serving a SavedModel'. classify takes the photograph after the whole "
    "preprocessing (field-of-view crop, resize with centred padding to size x size, method) "
    "as float32 in [0, 255]."
)


@dataclasses.dataclass
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        path: the export (a SavedModel folder, a `.keras` or a `.tflite` file).
        format: "savedmodel", "keras" or "tflite".
        signatures: names of the serving signatures (empty for "keras").
        differences: signature -> max abs difference from the Keras model,
            filled by `check=True`.
        metadata: the export metadata (what `assets/rmib.json` holds).
    """

    path: Path
    format: str
    signatures: list
    differences: dict
    metadata: dict


# --------------------------------------------------------------------------- metadata


def _signature_docs(task: str) -> dict:
    if task == "pretrain":
        return {
            "classify": {
                "inputs": {
                    "images": {
                        "dtype": "float32",
                        "shape": [None, "S", "S", 3],
                        "description": "preprocessed RGB photographs in [0, 255], S = size",
                    }
                },
                "outputs": {
                    "probability": {
                        "dtype": "float32",
                        "shape": [None, 1],
                        "description": "probability that the photograph shows a lesion",
                    }
                },
            }
        }
    return {
        "segment_patch": {
            "inputs": {
                "tiles": {
                    "dtype": "float32",
                    "shape": [None, "h", "w", 3],
                    "description": "preprocessed RGB tiles in [0, 255]; h, w multiples of "
                    "size_multiple",
                }
            },
            "outputs": {
                "probability": {
                    "dtype": "float32",
                    "shape": [None, "h", "w", 1],
                    "description": "lesion probability per pixel",
                }
            },
        },
        "segment_image": {
            "inputs": {
                "image": {
                    "dtype": "uint8",
                    "shape": ["H", "W", 3],
                    "description": "one whole photograph after the preprocessing named in "
                    "'preprocessing' (see caller_preprocessing)",
                },
                "fov": {
                    "dtype": "uint8",
                    "shape": ["H", "W"],
                    "description": "field-of-view mask 0/1 of that photograph; shape (0, 0) "
                    "for no masking",
                },
            },
            "outputs": {
                "probability": {
                    "dtype": "float32",
                    "shape": ["H", "W"],
                    "description": "lesion probability, tiles blended with a Gaussian window, "
                    "0 outside the field of view",
                },
                "mask": {
                    "dtype": "uint8",
                    "shape": ["H", "W"],
                    "description": "probability >= threshold, 0/1",
                },
            },
        },
    }


def export_metadata(run_metadata: dict, tile=None, overlap=None, batch_size=None) -> dict:
    """The metadata stored with an export: what the caller must know to feed it.

    Args:
        run_metadata: the run's rmib.json dict.
        tile, overlap, batch_size: tiling of ``segment_image`` (segmenters).

    Returns:
        A JSON-serialisable dict: task, lesion, preprocessing, threshold,
        tiling, the signatures' inputs and outputs, and the run's metadata.
    """
    from rmib import __version__
    from rmib.data.pipeline import Preprocessing
    from rmib.inference import WINDOW_FLOOR

    task = run_metadata.get("task")
    preprocessing = Preprocessing.from_dict(run_metadata.get("preprocessing")).to_dict()
    meta = {
        "format": "rmib-savedmodel",
        "format_version": EXPORT_FORMAT_VERSION,
        "task": task,
        "preprocessing": preprocessing,
        "threshold": float(run_metadata.get("threshold", DEFAULT_THRESHOLD)),
        "signatures": _signature_docs(task),
        "caller_preprocessing": CALLER_PREPROCESSING,
        "rmib_version": __version__,
        "run": run_metadata,
    }
    if task == "segment":
        meta.update(
            model=run_metadata.get("model", "encoder-decoder"),
            lesion=run_metadata.get("lesion"),
            tile=int(tile),
            overlap=float(overlap),
            tile_batch=int(batch_size),
            size_multiple=int(run_metadata.get("size_multiple", 32)),
            window={"kind": "separable gaussian", "sigma_fraction": 0.125, "floor": WINDOW_FLOOR},
        )
    else:
        meta["image_size"] = preprocessing.get("size") or run_metadata.get("image_size")
    return meta


# --------------------------------------------------------------------------- graph pieces


def _probability(model, batch):
    """The model's probability output, float32, whatever structure it returns."""
    import tensorflow as tf

    out = model(batch, training=False)
    if isinstance(out, dict):
        out = out[sorted(out)[0]]
    if isinstance(out, (list, tuple)):
        out = out[0]
    return tf.cast(out, tf.float32)


def _reflect_indices(length, padded_length):
    """Source rows of NumPy's ``np.pad(mode="reflect")`` (any pad width), as a triangle wave."""
    import tensorflow as tf

    index = tf.range(padded_length)
    period = tf.maximum(2 * (length - 1), 1)
    index = tf.math.floormod(index, period)
    return tf.where(index < length, index, period - index)


def _tile_starts(length, tile: int, stride: int):
    """`rmib.inference.tile_grid` in TensorFlow ops (``length >= tile``)."""
    import tensorflow as tf

    regular = tf.range(0, length - tile, stride)
    return tf.concat([regular, tf.reshape(length - tile, [1])], axis=0)


def tiled_probability(predict_fn, image, fov, tile: int, overlap: float, batch_size: int, depth=1):
    """`rmib.inference.predict_tiled` in TensorFlow ops, for a graph that serves whole images.

    Same tile grid (the last tile flush with the edge), reflect padding of an
    image smaller than the tile, skipping of tiles wholly outside the field of
    view, the same separable Gaussian window and weighted mean, and 0 outside
    the field of view.

    Args:
        predict_fn: (B, tile, tile, C) float32 -> (B, tile, tile, depth) float32.
        image: (H, W, C) float32 tensor.
        fov: (H, W) tensor, non-zero inside the field of view.
        tile, overlap, batch_size: as for `predict_tiled`.
        depth: channels of the prediction.

    Returns:
        float32 tensor (H, W, depth).
    """
    import tensorflow as tf

    from rmib.inference import weight_window

    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded_h, padded_w = tf.maximum(height, tile), tf.maximum(width, tile)
    rows = _reflect_indices(height, padded_h)
    cols = _reflect_indices(width, padded_w)
    padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
    stride = max(1, tile - round(overlap * tile))
    ys, xs = _tile_starts(padded_h, tile, stride), _tile_starts(padded_w, tile, stride)
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    positions = tf.stack([tf.reshape(grid_y, [-1]), tf.reshape(grid_x, [-1])], axis=1)

    # Tiles with no field-of-view pixel are skipped (their output is zeroed
    # anyway); a summed-area table counts the pixels of every tile at once.
    inside = tf.cast(tf.not_equal(fov, 0), tf.int32)
    inside = tf.pad(inside, [[1, padded_h - height], [1, padded_w - width]])
    table = tf.cumsum(tf.cumsum(inside, axis=0), axis=1)
    y0, x0 = positions[:, 0], positions[:, 1]
    y1, x1 = y0 + tile, x0 + tile

    def corner(y, x):
        return tf.gather_nd(table, tf.stack([y, x], axis=1))

    count = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
    in_view = tf.boolean_mask(positions, count > 0)
    positions = tf.cond(
        tf.size(in_view) > 0, lambda: in_view, lambda: positions[:1], name="tiles_in_view"
    )

    window = tf.constant(weight_window(tile))
    offsets = tf.range(tile)
    total = tf.shape(positions)[0]
    batches = (total + batch_size - 1) // batch_size
    output = tf.zeros(tf.stack([padded_h, padded_w, depth]), tf.float32)
    weight_sum = tf.zeros(tf.stack([padded_h, padded_w]), tf.float32)

    def body(i, output, weight_sum):
        batch = positions[i * batch_size : tf.minimum((i + 1) * batch_size, total)]
        tile_rows = batch[:, 0:1] + offsets[None, :]  # (b, tile)
        tile_cols = batch[:, 1:2] + offsets[None, :]
        tiles = tf.gather(padded, tile_rows, axis=0)  # (b, tile, W, C)
        tiles = tf.gather(tiles, tile_cols, axis=2, batch_dims=1)  # (b, tile, tile, C)
        tiles = tf.ensure_shape(tiles, [None, tile, tile, image.shape[-1]])
        prediction = tf.ensure_shape(predict_fn(tiles), [None, tile, tile, depth])
        b = tf.shape(batch)[0]
        index = tf.stack(
            [
                tf.broadcast_to(tile_rows[:, :, None], [b, tile, tile]),
                tf.broadcast_to(tile_cols[:, None, :], [b, tile, tile]),
            ],
            axis=-1,
        )
        output = tf.tensor_scatter_nd_add(output, index, prediction * window[None, :, :, None])
        weight_sum = tf.tensor_scatter_nd_add(
            weight_sum, index, tf.broadcast_to(window[None], [b, tile, tile])
        )
        return i + 1, output, weight_sum

    _, output, weight_sum = tf.while_loop(
        lambda i, *_: i < batches,
        body,
        [tf.constant(0), output, weight_sum],
        parallel_iterations=1,
        name="tiles",
    )
    output = output[:height, :width]
    weight_sum = weight_sum[:height, :width, None]
    output = tf.math.divide_no_nan(output, weight_sum)
    return output * tf.cast(tf.not_equal(fov, 0), tf.float32)[:, :, None]


def build_export_archive(model, metadata: dict, patch_size: int | None = None):
    """A `keras.export.ExportArchive` with the serving signatures of `metadata["task"]`.

    Args:
        model: the trained Keras model.
        metadata: what `export_metadata` returned.
        patch_size: fix the tile side of ``segment_patch`` (TFLite needs
            static channel counts, which unknown tile sides hide); None: any.

    Returns:
        (archive, names of the signatures).
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    metadata_json = json.dumps(metadata, indent=2, default=str)
    names = []
    if metadata["task"] == "pretrain":
        size = metadata.get("image_size")

        def classify(images):
            return {"probability": _probability(model, images)}

        archive.add_endpoint(
            "classify",
            classify,
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="images")],
        )
        names.append("classify")
    else:
        tile, overlap = metadata["tile"], metadata["overlap"]
        batch_size, threshold = metadata["tile_batch"], metadata["threshold"]

        def segment_patch(tiles):
            return {"probability": _probability(model, tiles)}

        def segment_image(image, fov):
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            fov = tf.cond(
                tf.size(fov) > 0,
                lambda: fov,
                lambda: tf.ones(tf.stack([height, width]), tf.uint8),
            )
            check = tf.debugging.assert_equal(
                tf.shape(fov), tf.shape(image)[:2], message="fov must be (H, W) like image"
            )
            with tf.control_dependencies([check]):
                image = tf.cast(image, tf.float32)
            prob = tiled_probability(
                lambda tiles: _probability(model, tiles), image, fov, tile, overlap, batch_size
            )[:, :, 0]
            mask = tf.cast(prob >= threshold, tf.uint8)
            return {"probability": prob, "mask": mask}

        archive.add_endpoint(
            "segment_patch",
            segment_patch,
            input_signature=[
                tf.TensorSpec((None, patch_size, patch_size, 3), tf.float32, name="tiles")
            ],
        )
        archive.add_endpoint(
            "segment_image",
            segment_image,
            input_signature=[
                tf.TensorSpec((None, None, 3), tf.uint8, name="image"),
                tf.TensorSpec((None, None), tf.uint8, name="fov"),
            ],
        )
        names += ["segment_patch", "segment_image"]

    def metadata_fn():
        return {"json": tf.constant(metadata_json)}

    archive.add_endpoint("metadata", metadata_fn, input_signature=[])
    return archive, names


# --------------------------------------------------------------------------- checks


def _sample_images(metadata: dict, seed: int = 0, patch_size: int | None = None):
    """Sample inputs for the checks: (classify batch | patch batch, whole image, fov)."""
    from rmib.data import synthetic
    from rmib.data.pipeline import Preprocessing, preprocess_array

    rng = np.random.default_rng(seed)
    if metadata["task"] == "pretrain":
        size = metadata["image_size"]
        return rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32), None, None
    patch = patch_size or 2 * metadata["size_multiple"]
    patches = rng.uniform(0, 255, (2, patch, patch, 3)).astype(np.float32)
    # A photograph about 1.5 tiles wide: several tiles, an edge tile flush with the border.
    side = max(64, metadata["tile"] * 3 // 2 + 7)
    photograph, _, _ = synthetic.synthesize_fundus((side, side + 13), seed=seed)
    prep = dataclasses.replace(
        Preprocessing.from_dict(metadata["preprocessing"]), centre_crop=False
    )
    image, _, fov = preprocess_array(photograph, prep)
    return patches, image, fov


def _max_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise RmibError(f"export check: output shape {a.shape} differs from the model's {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _reference(model, metadata: dict):
    """The Keras model's outputs on the sample inputs (segment_image: `TiledSegmenter`)."""
    from rmib.segmenters import TiledSegmenter

    batch, image, fov = _sample_images(metadata)
    expected = {batch_signature(metadata): np.asarray(_probability(model, batch))}
    if image is not None:
        segmenter = TiledSegmenter(
            model,
            metadata["run"],
            tile=metadata["tile"],
            overlap=metadata["overlap"],
            batch_size=metadata["tile_batch"],
        )
        expected["segment_image"] = segmenter.predict_prepared(image, fov)
    return (batch, image, fov), expected


def batch_signature(metadata: dict) -> str:
    """The batch signature of an export: "classify" or "segment_patch"."""
    return "classify" if metadata["task"] == "pretrain" else "segment_patch"


def check_savedmodel(path, model, metadata: dict) -> dict:
    """Reload a SavedModel with `tf.saved_model.load`; compare it with the Keras model.

    The batch signature gets random tiles or images; ``segment_image`` gets a
    synthetic photograph through the run's preprocessing and is compared with
    `rmib.segmenters.TiledSegmenter` (what `rmib predict` runs), its mask with
    the thresholded reference, and the `metadata` signature with `metadata`.

    Returns:
        signature -> max abs difference on the sample inputs.

    Raises:
        RmibError: a difference of `CHECK_TOLERANCE` or more, a different mask
            or metadata that does not read back.
    """
    import tensorflow as tf

    (batch, image, fov), expected = _reference(model, metadata)
    loaded = tf.saved_model.load(str(path))
    key = batch_signature(metadata)
    input_name = "images" if key == "classify" else "tiles"
    differences = {
        key: _max_difference(
            loaded.signatures[key](**{input_name: tf.constant(batch)})["probability"],
            expected[key],
        )
    }
    if image is not None:
        served = loaded.signatures["segment_image"](image=tf.constant(image), fov=tf.constant(fov))
        differences["segment_image"] = _max_difference(
            served["probability"], expected["segment_image"]
        )
        mask = (expected["segment_image"] >= metadata["threshold"]).astype(np.uint8)
        near = np.abs(expected["segment_image"] - metadata["threshold"]) < CHECK_TOLERANCE
        if np.any((served["mask"].numpy() != mask) & ~near):
            raise RmibError(f"export check failed: {path}: segment_image mask differs")
    stored = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode("utf-8"))
    if stored != json.loads(json.dumps(metadata, default=str)):
        raise RmibError(f"export check failed: {path}: the stored metadata does not read back")
    _raise_if_different(path, differences)
    return differences


def check_tflite(path, model, metadata: dict) -> dict:
    """Run a `.tflite` export with the TFLite interpreter; compare it with the Keras model."""
    import tensorflow as tf

    (batch, _, _), expected = _reference_batch_only(model, metadata, metadata.get("tile"))
    key = batch_signature(metadata)
    with warnings.catch_warnings():  # tf.lite.Interpreter's move to ai_edge_litert
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(key)
    input_name = "images" if key == "classify" else "tiles"
    served = runner(**{input_name: batch})["probability"]
    differences = {key: _max_difference(served, expected[key])}
    _raise_if_different(path, differences)
    return differences


def _reference_batch_only(model, metadata, patch_size=None):
    batch, _, _ = _sample_images(metadata, patch_size=patch_size)
    return (batch, None, None), {batch_signature(metadata): np.asarray(_probability(model, batch))}


def check_keras(path, model, metadata: dict, unsafe: bool = False) -> dict:
    """Reload a copied `.keras` file and compare it with the original model."""
    from rmib import training

    (batch, _, _), expected = _reference_batch_only(model, metadata)
    copy = training.load_model(path, unsafe=unsafe)
    key = batch_signature(metadata)
    differences = {key: _max_difference(_probability(copy, batch), expected[key])}
    _raise_if_different(path, differences)
    return differences


def _raise_if_different(path, differences: dict) -> None:
    bad = {k: v for k, v in differences.items() if not v < CHECK_TOLERANCE}
    if bad:
        text = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
        raise RmibError(
            f"export check failed: {path}: max abs difference from the Keras model {text} "
            f"(tolerance {CHECK_TOLERANCE:g}); the export was not written"
        )


# --------------------------------------------------------------------------- export


def _load(model_path, unsafe: bool):
    from rmib import training

    metadata = training.read_run_metadata(model_path)
    task = metadata.get("task")
    if task not in ("pretrain", "segment"):
        raise RmibError(
            f"{model_path}: not an rmib classifier or segmenter (task {task!r} in its metadata); "
            "rmib export takes a run of `rmib pretrain` or `rmib segment`, or its model.keras"
        )
    if task == "segment" and metadata.get("model", "encoder-decoder") not in TILED_MODEL_TYPES:
        raise RmibError(
            f"{model_path}: rmib export supports the encoder-decoder segmenter and classifiers, "
            f"not a {metadata.get('model')!r} model yet"
        )
    return training.load_model(model_path, unsafe=unsafe), metadata


def _tiling(metadata: dict, tile, overlap, batch_size):
    if metadata.get("task") != "segment":
        return None, None, None
    multiple = int(metadata.get("size_multiple", 32))
    tile = int(tile or metadata.get("predict_tile", 512))
    if tile % multiple:
        raise RmibError(f"--tile must be a multiple of {multiple}, got {tile}")
    overlap = DEFAULT_OVERLAP if overlap is None else float(overlap)
    if not 0 <= overlap < 1:
        raise RmibError(f"--overlap must be in [0, 1), got {overlap}")
    return tile, overlap, int(batch_size or DEFAULT_TILE_BATCH)


def _write_savedmodel(folder: Path, model, metadata: dict, patch_size=None) -> list:
    archive, names = build_export_archive(model, metadata, patch_size)
    archive.write_out(str(folder), verbose=False)
    _write_assets(folder, metadata)
    return names


def _write_assets(folder: Path, metadata: dict) -> None:
    assets = Path(folder) / "assets"
    assets.mkdir(exist_ok=True)
    (assets / METADATA_ASSET).write_text(
        json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8"
    )


def _convert_tflite(savedmodel: Path, signature: str) -> bytes:
    import tensorflow as tf

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


def export_model(
    model_path,
    out,
    format: str = "savedmodel",
    *,
    check: bool = False,
    unsafe: bool = False,
    tile: int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
) -> ExportResult:
    """Export a trained rmib model; written atomically (a failed export leaves no trace).

    Args:
        model_path: a run directory of `rmib pretrain` / `rmib segment`, or its `.keras`.
        out: the SavedModel folder, `.keras` file or `.tflite` file to write.
        format: "savedmodel", "keras" or "tflite" (the ``classify`` /
            ``segment_patch`` signature).
        check: reload the export and compare it with the Keras model on sample
            inputs; a max abs difference of `CHECK_TOLERANCE` or more is an
            error and nothing is written.
        unsafe: allow models with Lambda layers (`--unsafe-load`).
        tile, overlap, batch_size: tiling of ``segment_image``; default the
            run's ``predict_tile``, 0.125 and 2.

    Returns:
        An `ExportResult`.

    Raises:
        RmibError: not an rmib model, an unsupported model type, a bad tile or
            overlap, a failed TFLite conversion (naming the op) or a failed check.

    Example:
        >>> export_model("runs/ex", "exports/ex", check=True).differences
        {'segment_patch': 1.2e-07, 'segment_image': 2.4e-07}
    """
    if format not in EXPORT_FORMATS:
        raise RmibError(f"unknown export format {format!r}; expected {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    model, run_metadata = _load(model_path, unsafe)
    tile, overlap, batch_size = _tiling(run_metadata, tile, overlap, batch_size)
    metadata = export_metadata(run_metadata, tile, overlap, batch_size)
    differences = {}
    if format == "savedmodel":
        with io.atomic_directory(out) as folder:
            names = _write_savedmodel(folder, model, metadata)
            if check:
                differences = check_savedmodel(folder, model, metadata)
    elif format == "keras":
        from rmib import training

        source = Path(model_path)
        if source.is_dir():
            source = training.RunDirectory(source, create=False).model_path
        names = []
        with io.atomic_path(out) as tmp:
            shutil.copyfile(source, tmp)
            if check:
                differences = check_keras(tmp, model, metadata, unsafe=unsafe)
    else:
        signature = batch_signature(metadata)
        names = [signature]
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".rmib-export-", dir=out.parent) as scratch:
            savedmodel = Path(scratch) / "savedmodel"
            # TFLite wants static channel counts: fix the tile side of segment_patch.
            _write_savedmodel(savedmodel, model, metadata, metadata.get("tile"))
            flat = _convert_tflite(savedmodel, signature)
            with io.atomic_path(out) as tmp:
                tmp.write_bytes(flat)
                if check:
                    differences = check_tflite(tmp, model, metadata)
    return ExportResult(out, format, names, differences, metadata)


__all__ = [
    "CHECK_TOLERANCE",
    "EXPORT_FORMATS",
    "ExportResult",
    "batch_signature",
    "build_export_archive",
    "check_keras",
    "check_savedmodel",
    "check_tflite",
    "export_metadata",
    "export_model",
    "tiled_probability",
]
