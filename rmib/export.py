"""`rmib export`: a trained model as a TensorFlow SavedModel, a `.keras` file or TFLite.

The SavedModel (written with Keras 3 `keras.export.ExportArchive`) needs
neither rmib nor Keras to serve: TensorFlow alone loads it. Its named
signatures, by the kind of run (``kind`` in the metadata):

- ``classifier`` (`rmib pretrain`): ``classify(images)``, a batch of
  preprocessed photographs float32 in [0, 255], (None, S, S, 3) ->
  ``{"probability": (None, 1)}``.
- ``tiled`` (the encoder-decoder; LocalNet alone of a local-global run):
  ``segment_patch(tiles)``, float32 in [0, 255], (None, h, w, 3) with h, w
  multiples of ``size_multiple`` -> ``{"probability": (None, h, w, 1)}``.
- ``fused`` (the local-global U-Net): ``segment_patch(tiles, boxes,
  global_image)``: the tiles, their normalised boxes (y0, x0, y1, x1) in the
  whole photograph and that photograph resized to ``global_size`` (one
  shared by every tile, or one per tile) -> ``{"probability": (None, h, w, 1)}``.
- ``resized`` (Dual2Net; GlobalNet alone of a local-global run):
  ``segment_resized(images)``, photographs already resized to the model's
  input size -> ``{"probability": (None, h, w, 1)}``.
- every segmenter: ``segment_image(image, fov)``, one whole preprocessed
  photograph uint8 (H, W, 3) of any size and its field-of-view mask uint8
  (H, W) (shape (0, 0) for no masking) -> ``{"probability": (H, W) float32,
  "mask": (H, W) uint8}``, computed as `rmib predict` computes it: tiling,
  Gaussian blending and field-of-view masking (tiled, fused: GlobalNet runs
  once per photograph), or the resize to the model's size and back (resized;
  OpenCV's ``INTER_AREA`` reproduced bit for bit in TensorFlow ops by
  `opencv_area_resize`), inside the graph.
- ``grader`` (`rmib grade train`): ``classify(images)`` (the global net on
  weighted lesion maps resized to ``global_size``), ``classify_patch(patches)``
  (the local net), ``grade_image(image)``: the whole two-stage pipeline of
  Yang et al. (MICCAI 2017) on one preprocessed photograph (grid patches ->
  local net -> weighting matrix M -> I* = M / 4 * I resized -> global net),
  and ``classify_plain(images)`` when the run trained the non-weighted baseline.
- all: ``metadata()`` -> ``{"json": string}``, the same JSON as ``assets/rmib.json``.

CLAHE and the field-of-view detection have no TensorFlow ops, so
``segment_image`` and ``grade_image`` take the photograph *after* the
preprocessing the metadata names (with its field-of-view mask); README
"Serving a SavedModel" has the short OpenCV function that does it. Keeping it
outside the graph keeps the export faithful: an approximate in-graph CLAHE
would silently change the model's input.
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
from rmib.choices import EXPORT_FORMATS
from rmib.choices import SEGMENT_MODELS as SEGMENTATION_MODEL_TYPES
from rmib.errors import RmibError

CHECK_TOLERANCE = 1e-4
EXPORT_FORMAT_VERSION = 2
METADATA_ASSET = "rmib.json"
DEFAULT_PATCH_BATCH = 64  # local-net patches per call in grade_image
DEFAULT_THRESHOLD = 0.5
KINDS = ("classifier", "tiled", "fused", "resized", "grader")
BATCH_SIGNATURES = {
    "classifier": "classify",
    "tiled": "segment_patch",
    "fused": "segment_patch",
    "resized": "segment_resized",
    "grader": "classify",
}
_DBL_EPSILON = 2.220446049250313e-16

_METHODS = (
    "method: 'clahe' = OpenCV CLAHE clip 1.5, 8x8 tiles on the LAB L channel; 'graham' = "
    "4 I - 4 GaussianBlur(I, sigma 10 * max(H, W) / 800) + 128; 'none'"
)
CALLER_PREPROCESSING = (
    "segment_image takes the photograph after the preprocessing named in 'preprocessing' "
    "(if centre_crop and the photograph is at least 2816 x 3328: its centre 2816 x 3328, "
    "then the field-of-view mask of that photograph, then "
    f"{_METHODS}), "
    "as uint8 RGB, and the field-of-view mask as uint8 0/1 (or shape (0, 0) for none); "
    "see README 'Serving a SavedModel'. classify takes the photograph after the whole "
    "preprocessing (field-of-view crop, resize with centred padding to size x size, method) "
    "as float32 in [0, 255]."
)
_FOV_CROP_PREPROCESSING = (
    "segment_image takes the photograph after the preprocessing named in 'preprocessing' "
    "(if centre_crop and the photograph is at least 2816 x 3328: its centre 2816 x 3328; "
    "then its field-of-view mask; if fov_crop: the photograph and the mask cropped to the "
    "mask's bounding box (the rows and columns holding a field-of-view pixel), the output "
    f"belonging to that box; then {_METHODS}), "
    "as uint8 RGB, and the field-of-view mask as uint8 0/1 (or shape (0, 0) for none); "
    "see README 'Serving a SavedModel'."
)
_GRADER_PREPROCESSING = (
    "grade_image takes the photograph after the whole preprocessing named in "
    "'preprocessing': its field-of-view mask; if fov_crop: the photograph cropped to the "
    "mask's bounding box; resized keeping the aspect ratio (OpenCV INTER_AREA) and padded "
    "with black, centred, to image_size x image_size; then "
    f"{_METHODS}; as uint8 RGB (see README 'Serving a SavedModel'). classify and "
    "classify_plain take the global net's input float32 in [0, 255], classify_patch the "
    "local net's patches float32 in [0, 255]."
)


@dataclasses.dataclass
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        path: the export (a SavedModel folder, a `.keras` or a `.tflite` file).
        format: "savedmodel", "keras" or "tflite".
        signatures: names of the serving signatures (empty for "keras").
        differences: signature -> max abs difference from rmib's own
            prediction, filled by `check=True`.
        metadata: the export metadata (what `assets/rmib.json` holds).
        precision: the policy the export computes in ("float32" by default).
        tolerance: the largest difference the check accepts
            (`rmib.precision.check_tolerance` of `precision`).
    """

    path: Path
    format: str
    signatures: list
    differences: dict
    metadata: dict
    precision: str = "float32"
    tolerance: float = CHECK_TOLERANCE


# --------------------------------------------------------------------------- kinds


def serving_kind(run_metadata: dict) -> str:
    """Which set of signatures a run exports as: one of `KINDS`.

    Raises:
        RmibError: a run rmib cannot export (unknown task or model type).
    """
    task = run_metadata.get("task")
    if task == "pretrain":
        return "classifier"
    if task == "grade":
        return "grader"
    if task != "segment":
        raise RmibError(
            f"not an rmib classifier, segmenter or grader (task {task!r} in its metadata); "
            "rmib export takes a run of `rmib pretrain`, `rmib segment` or `rmib grade train`"
        )
    model_type = run_metadata.get("model", "encoder-decoder")
    if model_type == "encoder-decoder":
        scale = run_metadata.get("scale", 1.0)
        if scale != 1.0:
            raise RmibError(
                f"rmib export: this run predicts at scale {scale} (rmib segment --scale), and "
                "the exported segment_image tiles at full resolution without resizing, so it "
                "would serve different maps; use rmib predict, or export a run at scale 1"
            )
        return "tiled"
    if model_type == "dual2net":
        return "resized"
    if model_type == "local-global":
        network = run_metadata.get("network", "fused")
        kinds = {"fused": "fused", "local": "tiled", "global": "resized"}
        if network not in kinds:
            raise RmibError(
                f"unknown local-global network {network!r} in the metadata; "
                f"expected one of {', '.join(kinds)}"
            )
        return kinds[network]
    raise RmibError(
        f"rmib export does not know the segmentation model type {model_type!r} "
        f"(known: {', '.join(SEGMENTATION_MODEL_TYPES)})"
    )


def batch_signature(metadata: dict) -> str:
    """The batch signature of an export, the one TFLite holds: "classify",
    "segment_patch" or "segment_resized"."""
    return BATCH_SIGNATURES[metadata.get("kind") or serving_kind(metadata["run"])]


# --------------------------------------------------------------------------- metadata


def _spec(dtype: str, shape: list, description: str) -> dict:
    return {"dtype": dtype, "shape": shape, "description": description}


_PROBABILITY_MAP = {
    "probability": _spec(
        "float32", [None, "h", "w", 1], "lesion probability per pixel of each input"
    )
}


def _segment_image_docs(how: str) -> dict:
    return {
        "inputs": {
            "image": _spec(
                "uint8",
                ["H", "W", 3],
                "one whole photograph after the preprocessing named in 'preprocessing' "
                "(see caller_preprocessing)",
            ),
            "fov": _spec(
                "uint8",
                ["H", "W"],
                "field-of-view mask 0/1 of that photograph; shape (0, 0) for no masking",
            ),
        },
        "outputs": {
            "probability": _spec(
                "float32", ["H", "W"], f"lesion probability, {how}, 0 outside the field of view"
            ),
            "mask": _spec("uint8", ["H", "W"], "probability >= threshold, 0/1"),
        },
    }


def _signature_docs(kind: str, meta: dict | None = None) -> dict:
    """Names, dtypes, shapes and meaning of every input and output of a kind's signatures."""
    meta = meta or {}
    if kind == "classifier":
        return {
            "classify": {
                "inputs": {
                    "images": _spec(
                        "float32",
                        [None, "S", "S", 3],
                        "preprocessed RGB photographs in [0, 255], S = size",
                    )
                },
                "outputs": {
                    "probability": _spec(
                        "float32", [None, 1], "probability that the photograph shows a lesion"
                    )
                },
            }
        }
    if kind == "grader":
        size, patch, side = meta.get("image_size"), meta.get("patch_size"), meta.get("global_size")
        n, grades = len(meta.get("grid_positions") or []) or "n", meta.get("grades") or "K"
        classify = {
            "inputs": {
                "images": _spec(
                    "float32",
                    [None, side, side, 3],
                    "the global net's input in [0, 255]: I* = M / 4 * I resized to global_size "
                    "(with OpenCV INTER_AREA) and rounded to whole numbers",
                )
            },
            "outputs": {
                "probabilities": _spec("float32", [None, grades], "softmax over the DR grades"),
                "grade": _spec("int32", [None], "the most probable grade"),
            },
        }
        docs = {
            "classify": classify,
            "classify_patch": {
                "inputs": {
                    "patches": _spec(
                        "float32",
                        [None, patch, patch, 3],
                        "patches of the preprocessed photograph in [0, 255]",
                    )
                },
                "outputs": {
                    "probabilities": _spec(
                        "float32",
                        [None, len(meta.get("patch_classes") or []) or 4],
                        "softmax over patch_classes (normal, MA, HE, EX)",
                    ),
                    "label": _spec("int32", [None], "the most probable patch class"),
                },
            },
            "grade_image": {
                "inputs": {
                    "image": _spec(
                        "uint8",
                        [size, size, 3],
                        "one photograph after the whole preprocessing (see caller_preprocessing)",
                    )
                },
                "outputs": {
                    "probabilities": _spec(
                        "float32", [grades], "the global net's softmax over the DR grades"
                    ),
                    "grade": _spec("int32", [], "the most probable grade"),
                    "weights": _spec(
                        "float32",
                        [size, size],
                        "the weighting matrix M in [0, 4]: per pixel, the mean of "
                        "(label + 1) * probability over the grid patches covering it",
                    ),
                    "labels": _spec(
                        "int32", [n, n], "the local net's label of each grid patch (row-major)"
                    ),
                    "patch_probabilities": _spec(
                        "float32", [n, n], "the local net's largest probability of each patch"
                    ),
                },
            },
        }
        if meta.get("baseline"):
            docs["classify_plain"] = {
                "inputs": {
                    "images": _spec(
                        "float32",
                        [None, side, side, 3],
                        "the preprocessed photograph itself resized to global_size "
                        "(INTER_AREA) and rounded: the non-weighted baseline's input",
                    )
                },
                "outputs": dict(classify["outputs"]),
            }
            outputs = docs["grade_image"]["outputs"]
            outputs["plain_probabilities"] = _spec(
                "float32", [grades], "the non-weighted baseline's softmax over the grades"
            )
            outputs["plain_grade"] = _spec("int32", [], "the baseline's most probable grade")
        return docs
    if kind == "tiled":
        docs = {
            "segment_patch": {
                "inputs": {
                    "tiles": _spec(
                        "float32",
                        [None, "h", "w", 3],
                        "preprocessed RGB tiles in [0, 255]; h, w multiples of size_multiple",
                    )
                },
                "outputs": _PROBABILITY_MAP,
            }
        }
        how = "tiles blended with a Gaussian window"
    elif kind == "fused":
        side = meta.get("global_size", "G")
        docs = {
            "segment_patch": {
                "inputs": {
                    "tiles": _spec(
                        "float32",
                        [None, "h", "w", 3],
                        "full-resolution tiles of the preprocessed photograph in [0, 255]; "
                        "h, w multiples of size_multiple",
                    ),
                    "boxes": _spec(
                        "float32",
                        [None, 4],
                        "each tile's box (y0, x0, y1, x1) normalised by the photograph's "
                        "height and width, edge to edge: (top / H, left / W, (top + h) / H, "
                        "(left + w) / W)",
                    ),
                    "global_image": _spec(
                        "float32",
                        ["N", side, side, 3],
                        "the whole preprocessed photograph resized to global_size x "
                        "global_size (INTER_AREA, aspect not kept), in [0, 255]; N = 1 (every "
                        "tile comes from that photograph) or N = the number of tiles",
                    ),
                },
                "outputs": _PROBABILITY_MAP,
            }
        }
        how = (
            "GlobalNet run once on the photograph resized to global_size, every tile through "
            "LocalNet and the fusion head with its crop of GlobalNet's features, tiles blended "
            "with a Gaussian window"
        )
    else:
        height, width = meta.get("input_size") or ("h", "w")
        docs = {
            "segment_resized": {
                "inputs": {
                    "images": _spec(
                        "float32",
                        [None, height, width, 3],
                        "preprocessed photographs resized to the model's input size "
                        "(see 'resize'), in [0, 255]",
                    )
                },
                "outputs": {
                    "probability": _spec(
                        "float32", [None, height, width, 1], "lesion probability per pixel"
                    )
                },
            }
        }
        how = "predicted on the photograph resized to the model's size, resized back (bilinear)"
    docs["segment_image"] = _segment_image_docs(how)
    return docs


def _caller_preprocessing(kind: str, preprocessing: dict) -> str:
    if kind == "grader":
        return _GRADER_PREPROCESSING
    if preprocessing.get("fov_crop") and kind != "classifier":
        return _FOV_CROP_PREPROCESSING
    return CALLER_PREPROCESSING


def export_metadata(
    run_metadata: dict,
    tile=None,
    overlap=None,
    batch_size=None,
    patch_batch=None,
    precision: str = "float32",
) -> dict:
    """The metadata stored with an export: what the caller must know to feed it.

    Args:
        run_metadata: the run's rmib.json dict.
        tile, overlap, batch_size: tiling of ``segment_image`` (tiled and fused kinds).
        patch_batch: local-net patches per call in ``grade_image`` (graders).
        precision: the policy the exported graph computes in.

    Returns:
        A JSON-serialisable dict: kind, task, preprocessing, the signatures'
        inputs and outputs, what each kind needs (lesion, threshold, tiling,
        sizes, grid) and the run's metadata.

    Raises:
        RmibError: a run rmib cannot export.
    """
    from rmib import __version__
    from rmib.data.pipeline import Preprocessing
    from rmib.inference.tiling import WINDOW_FLOOR

    kind = serving_kind(run_metadata)
    task = run_metadata.get("task")
    preprocessing = Preprocessing.from_dict(run_metadata.get("preprocessing")).to_dict()
    meta = {
        "format": "rmib-savedmodel",
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "task": task,
        "preprocessing": preprocessing,
        "precision": precision,
        "trained_precision": run_metadata.get("precision"),
    }
    if kind != "grader":
        meta["threshold"] = float(run_metadata.get("threshold", DEFAULT_THRESHOLD))
    if kind == "classifier":
        meta["image_size"] = preprocessing.get("size") or run_metadata.get("image_size")
    elif kind == "grader":
        from rmib.grading import grid_positions

        size, patch = int(run_metadata["image_size"]), int(run_metadata["patch_size"])
        grid_overlap = int(run_metadata["overlap"])
        meta.update(
            model=run_metadata.get("model"),
            image_size=size,
            patch_size=patch,
            overlap=grid_overlap,
            grid_positions=grid_positions(size, patch, grid_overlap),
            grades=int(run_metadata["grades"]),
            grade_names=run_metadata.get("grade_names"),
            patch_classes=run_metadata.get("patch_classes"),
            global_size=int(run_metadata["global_size"]),
            global_net=run_metadata.get("global_net"),
            baseline=bool(run_metadata.get("baseline")),
            patch_batch=int(patch_batch or DEFAULT_PATCH_BATCH),
            lesion_map={
                "weights": "M = mean over the covering grid patches of (label + 1) * probability",
                "global_input": "rint(clip(INTER_AREA resize of M / 4 * I to global_size))",
            },
        )
    else:
        model_type = run_metadata.get("model", "encoder-decoder")
        meta.update(model=model_type, lesion=run_metadata.get("lesion"))
        if model_type == "local-global":
            meta["network"] = run_metadata.get("network", "fused")
        if kind in ("tiled", "fused"):
            multiple = run_metadata.get("size_multiple", 32)
            if model_type == "local-global":
                multiple = 2 ** int((run_metadata.get("depths") or {}).get("local", 0))
            meta.update(
                tile=int(tile),
                overlap=float(overlap),
                tile_batch=int(batch_size),
                size_multiple=int(multiple),
                window={
                    "kind": "separable gaussian",
                    "sigma_fraction": 0.125,
                    "floor": WINDOW_FLOOR,
                },
            )
        if kind == "fused":
            meta["global_size"] = int(run_metadata.get("global_size", 640))
        if kind == "resized":
            meta.update(_resize_rule(run_metadata))
    meta["signatures"] = _signature_docs(kind, meta)
    meta["caller_preprocessing"] = _caller_preprocessing(kind, preprocessing)
    meta["rmib_version"] = __version__
    meta["run"] = run_metadata
    return meta


def _resize_rule(run_metadata: dict) -> dict:
    """How a "resized" model sees a photograph: its input size and the resize rule."""
    if run_metadata.get("model") == "dual2net":
        size = run_metadata.get("image_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise RmibError(
                f"the Dual2Net run's metadata has no image_size [height, width] (got {size!r})"
            )
        height, width = int(size[0]), int(size[1])
        return {
            "input_size": [height, width],
            "size_multiple": int(run_metadata.get("size_multiple", 32)),
            "resize": {
                "keep_aspect": True,
                "source": "uint8",
                "down": "OpenCV INTER_AREA of the uint8 photograph to fit input_size, aspect "
                "kept, padded with zeros, centred (rmib.data.fundus.resize_pad)",
                "back": "bilinear (OpenCV INTER_LINEAR) of the unpadded part to the "
                "photograph's size, clipped to [0, 1]",
            },
        }
    side = int(run_metadata.get("global_size", 640))
    return {
        "input_size": [side, side],
        "size_multiple": 2 ** int((run_metadata.get("depths") or {}).get("global", 0)),
        "resize": {
            "keep_aspect": False,
            "source": "float32",
            "down": "OpenCV INTER_AREA of the float32 photograph to input_size, aspect not kept",
            "back": "bilinear (OpenCV INTER_LINEAR) to the photograph's size, clipped to [0, 1]",
        },
    }


# --------------------------------------------------------------------------- graph pieces


def _probability(model, batch):
    """The model's probability output, float32, whatever structure it returns.

    Runs the model in a `tf.function`, as `rmib predict` does: under a mixed
    policy, eager execution rounds after every op while a graph fuses ops
    (e.g. convolution, bias and ReLU in one oneDNN kernel), and the two differ
    by up to 0.06 in probability on a bfloat16 encoder-decoder (issue 15); the
    SavedModel runs the same graph as rmib's own prediction, bit for bit.
    """
    import tensorflow as tf

    from rmib.inference.segmenter import compiled_predict

    if tf.executing_eagerly():
        return compiled_predict(model, int(batch.shape[-1]))(tf.cast(batch, tf.float32))
    # Inside a signature being traced: the model joins that graph.
    return compiled_predict(model, int(batch.shape[-1])).python_function(batch)


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


def tiled_probability(
    predict_fn, image, fov, tile: int, overlap: float, batch_size: int, depth=1, with_boxes=False
):
    """`rmib.inference.predict_tiled` in TensorFlow ops, for a graph that serves whole images.

    Same tile grid (the last tile flush with the edge), reflect padding of an
    image smaller than the tile, skipping of tiles wholly outside the field of
    view, the same separable Gaussian window and weighted mean, and 0 outside
    the field of view.

    Args:
        predict_fn: (B, tile, tile, C) float32 -> (B, tile, tile, depth)
            float32; with `with_boxes`, (tiles, boxes (B, 4) float32) -> the same.
        image: (H, W, C) float32 tensor.
        fov: (H, W) tensor, non-zero inside the field of view.
        tile, overlap, batch_size: as for `predict_tiled`.
        depth: channels of the prediction.
        with_boxes: also pass each tile's normalised box (y0, x0, y1, x1) in the
            unpadded image, as ``predict_tiled(with_boxes=True)`` does.

    Returns:
        float32 tensor (H, W, depth).
    """
    import tensorflow as tf

    from rmib.inference.tiling import weight_window

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
    size = tf.cast(tf.stack([height, width, height, width]), tf.float64)

    def body(i, output, weight_sum):
        batch = positions[i * batch_size : tf.minimum((i + 1) * batch_size, total)]
        tile_rows = batch[:, 0:1] + offsets[None, :]  # (b, tile)
        tile_cols = batch[:, 1:2] + offsets[None, :]
        tiles = tf.gather(padded, tile_rows, axis=0)  # (b, tile, W, C)
        tiles = tf.gather(tiles, tile_cols, axis=2, batch_dims=1)  # (b, tile, tile, C)
        tiles = tf.ensure_shape(tiles, [None, tile, tile, image.shape[-1]])
        if with_boxes:
            # As predict_tiled: y / H in float64, then float32.
            corners = tf.cast(tf.concat([batch, batch + tile], axis=1), tf.float64)
            boxes = tf.cast(corners / size, tf.float32)
            prediction = predict_fn(tiles, boxes)
        else:
            prediction = predict_fn(tiles)
        prediction = tf.ensure_shape(prediction, [None, tile, tile, depth])
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


# --------------------------------------------------------------------------- OpenCV resizes
#
# Dual2Net resizes the uint8 photograph and the grader the float lesion map
# I* (then rounds it): a resize that differs from OpenCV's by one float ulp
# can move a value across a rounding boundary and change the model's input by
# a whole grey level. These functions repeat OpenCV's INTER_AREA arithmetic
# (its tables, float32 accumulation order and rounding), so the export's
# model input is the one rmib's Python code computes, bit for bit.


def _f64(x):
    import tensorflow as tf

    return tf.cast(x, tf.float64)


def _area_taps(source, target):
    """OpenCV's INTER_AREA table along one axis (source >= target).

    Returns (index, weight), both (target, K): output pixel i is the sum over
    k of input[index[i, k]] * weight[i, k], in order of k (unused taps weigh 0).
    """
    import tensorflow as tf

    source_f = _f64(source)
    scale = 1.0 / (_f64(target) / source_f)
    start = _f64(tf.range(target)) * scale
    end = start + scale
    cell = tf.minimum(scale, source_f - start)
    last = tf.minimum(tf.floor(end), source_f - 1.0)
    first = tf.minimum(tf.math.ceil(start), last)
    n_left = tf.cast(first - start > 1e-3, tf.int32)[:, None]
    n_mid = tf.cast(last - first, tf.int32)[:, None]
    n_right = tf.cast(end - last > 1e-3, tf.int32)[:, None]
    w_left = tf.cast((first - start) / cell, tf.float32)[:, None]
    w_mid = tf.cast(1.0 / cell, tf.float32)[:, None]
    w_right = tf.cast(tf.minimum(tf.minimum(end - last, 1.0), cell) / cell, tf.float32)[:, None]
    count = n_left + n_mid + n_right
    k = tf.range(tf.reduce_max(count))[None, :]
    first_i, last_i = tf.cast(first, tf.int32)[:, None], tf.cast(last, tf.int32)[:, None]
    is_left = k < n_left
    is_mid = (k >= n_left) & (k < n_left + n_mid)
    is_right = (k >= n_left + n_mid) & (k < count)
    zeros = tf.zeros_like(k)
    index = tf.where(
        is_left,
        first_i - 1 + zeros,
        tf.where(is_mid, first_i + k - n_left, tf.where(is_right, last_i + zeros, zeros)),
    )
    none = tf.zeros(tf.shape(index), tf.float32)
    weight = tf.where(
        is_left,
        w_left + none,
        tf.where(is_mid, w_mid + none, tf.where(is_right, w_right + none, none)),
    )
    return index, weight


def _weighted_taps(values, index, weight, axis: int):
    """sum_k values[index[:, k]] * weight[:, k] along `axis`, accumulated in OpenCV's order."""
    import tensorflow as tf

    shape = [1, 1, 1]
    shape[axis] = -1
    out_shape = tf.tensor_scatter_nd_update(tf.shape(values), [[axis]], tf.shape(index)[:1])

    def body(k, total):
        taken = tf.gather(values, index[:, k], axis=axis)
        return k + 1, total + taken * tf.reshape(weight[:, k], shape)

    _, total = tf.while_loop(
        lambda k, _: k < tf.shape(index)[1],
        body,
        [tf.constant(0), tf.zeros(out_shape, tf.float32)],
        shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None, values.shape[-1]])],
        parallel_iterations=1,
    )
    return total


def _to_uint8(values):
    import tensorflow as tf

    # OpenCV's saturate_cast rounds halves to even, as tf.round does.
    return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), tf.uint8)


def _area_shrinking(image, height, width):
    import tensorflow as tf

    source = tf.cast(image, tf.float32)
    index, weight = _area_taps(tf.shape(source)[1], width)
    rows = _weighted_taps(source, index, weight, axis=1)
    index, weight = _area_taps(tf.shape(source)[0], height)
    out = _weighted_taps(rows, index, weight, axis=0)
    return _to_uint8(out) if image.dtype == tf.uint8 else out


def _area_integer(image, height, width):
    """Integer factors on both axes: OpenCV's fast path (block sums, one multiplication)."""
    import tensorflow as tf

    size = tf.shape(image)
    step_y, step_x = size[0] // height, size[1] // width
    channels = image.shape[-1]
    blocks = tf.reshape(
        image[: height * step_y, : width * step_x],
        tf.stack([height, step_y, width, step_x, channels]),
    )
    area = step_y * step_x
    blocks = tf.reshape(
        tf.transpose(blocks, [1, 3, 0, 2, 4]), tf.stack([area, height, width, channels])
    )
    inverse = tf.constant(1.0, tf.float32) / tf.cast(area, tf.float32)
    if image.dtype == tf.uint8:
        total = tf.reduce_sum(tf.cast(blocks, tf.int32), axis=0)
        halves_up = tf.bitwise.right_shift(total + 2, 2)  # OpenCV's SIMD 2 x 2 path
        even = tf.cast(_to_uint8(tf.cast(total, tf.float32) * inverse), tf.int32)
        two_by_two = tf.equal(step_y, 2) & tf.equal(step_x, 2)
        return tf.cast(tf.where(two_by_two, halves_up, even), tf.uint8)
    blocks = tf.cast(blocks, tf.float32)
    fours = area // 4

    def four(i, total):
        j = 4 * i
        return i + 1, total + (((blocks[j] + blocks[j + 1]) + blocks[j + 2]) + blocks[j + 3])

    def one(j, total):
        return j + 1, total + blocks[j]

    zero = tf.zeros(tf.shape(blocks)[1:], tf.float32)
    _, total = tf.while_loop(
        lambda i, _: i < fours, four, [tf.constant(0), zero], parallel_iterations=1
    )
    _, total = tf.while_loop(lambda j, _: j < area, one, [4 * fours, total], parallel_iterations=1)
    return total * inverse


def _enlarging_coefficients(source, target):
    """OpenCV's INTER_AREA coefficients when an axis grows: (first, second, fraction)."""
    import tensorflow as tf

    inverse = _f64(target) / _f64(source)
    scale = 1.0 / inverse
    position = _f64(tf.range(target))
    start = tf.floor(position * scale)
    fraction = tf.cast((position + 1.0) - (start + 1.0) * inverse, tf.float32)
    fraction = tf.where(fraction <= 0.0, 0.0, fraction - tf.floor(fraction))
    start = tf.cast(start, tf.int32)
    fraction = tf.where(start < 0, 0.0, fraction)
    start = tf.maximum(start, 0)
    fraction = tf.where(start >= source - 1, 0.0, fraction)
    start = tf.minimum(start, source - 1)
    return start, tf.minimum(start + 1, source - 1), fraction


def _area_enlarging(image, height, width):
    """INTER_AREA when either axis grows: OpenCV's bilinear variant (fixed point for uint8)."""
    import tensorflow as tf

    size = tf.shape(image)
    x0, x1, fx = _enlarging_coefficients(size[1], width)
    y0, y1, fy = _enlarging_coefficients(size[0], height)
    if image.dtype == tf.uint8:

        def fixed(fraction):  # 11 fractional bits, OpenCV's INTER_RESIZE_COEF_BITS
            return tf.cast(tf.round(fraction * 2048.0), tf.int32)

        shift = tf.bitwise.right_shift
        source = tf.cast(image, tf.int32)
        rows = tf.gather(source, x0, axis=1) * fixed(1.0 - fx)[None, :, None]
        rows += tf.gather(source, x1, axis=1) * fixed(fx)[None, :, None]
        top = shift(fixed(1.0 - fy)[:, None, None] * shift(tf.gather(rows, y0, axis=0), 4), 16)
        bottom = shift(fixed(fy)[:, None, None] * shift(tf.gather(rows, y1, axis=0), 4), 16)
        return tf.cast(tf.clip_by_value(shift(top + bottom + 2, 2), 0, 255), tf.uint8)
    source = tf.cast(image, tf.float32)
    fx, fy = fx[None, :, None], fy[:, None, None]
    rows = tf.gather(source, x0, axis=1) * (1.0 - fx) + tf.gather(source, x1, axis=1) * fx
    return tf.gather(rows, y0, axis=0) * (1.0 - fy) + tf.gather(rows, y1, axis=0) * fy


def opencv_area_resize(image, height, width):
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)`` in TensorFlow ops.

    Bit for bit what OpenCV (4.x and 5.x, CPU) computes: its area tables and
    float32 accumulation order when shrinking, its block-sum fast path for
    integer factors (halves rounded up in the uint8 2 x 2 case, as its SIMD
    code does), and its bilinear variant when an axis grows (fixed point with
    11 fractional bits for uint8).

    Args:
        image: (H, W, C) uint8 or float32 tensor, C known.
        height, width: the output size (ints or int32 scalars).

    Returns:
        (height, width, C) tensor of the image's dtype.
    """
    import tensorflow as tf

    size = tf.shape(image)
    height = tf.convert_to_tensor(height, tf.int32)
    width = tf.convert_to_tensor(width, tf.int32)
    scale_y = 1.0 / (_f64(height) / _f64(size[0]))
    scale_x = 1.0 / (_f64(width) / _f64(size[1]))
    shrinking = (scale_x >= 1.0) & (scale_y >= 1.0)
    integer = (tf.abs(scale_x - tf.round(scale_x)) < _DBL_EPSILON) & (
        tf.abs(scale_y - tf.round(scale_y)) < _DBL_EPSILON
    )
    out = tf.case(
        [
            (shrinking & integer, lambda: _area_integer(image, height, width)),
            (shrinking, lambda: _area_shrinking(image, height, width)),
        ],
        default=lambda: _area_enlarging(image, height, width),
        exclusive=False,
    )
    return tf.ensure_shape(out, [None, None, image.shape[-1]])


def _bilinear_resize(values, height, width):
    """(h, w) float32 -> (height, width): ``cv2.INTER_LINEAR`` (half-pixel centres).

    No rounding follows it, so TensorFlow's own bilinear resize, within a few
    float32 ulps of OpenCV's, is enough here.
    """
    import tensorflow as tf

    out = tf.image.resize(values[None, :, :, None], tf.stack([height, width]), method="bilinear")
    return out[0, :, :, 0]


def resized_probability(predict_fn, image, fov, input_size, keep_aspect: bool):
    """Predict a whole photograph on a resized copy, as the "resized" segmenters do.

    Dual2Net (``keep_aspect``, `rmib.methods.dual2net.segmenter.Dual2NetSegmenter`):
    `rmib.data.fundus.resize_pad` of the uint8 photograph to `input_size`,
    the model, the unpadded part resized back (bilinear), clipped to [0, 1],
    0 outside the field of view. GlobalNet alone (not ``keep_aspect``,
    `rmib.methods.local_global.segmenter.LocalGlobalSegmenter`): the float32 photograph
    resized to `input_size`, aspect not kept, then the same.

    Args:
        predict_fn: (1, h, w, 3) float32 -> (1, h, w, 1) float32.
        image: (H, W, 3) tensor: uint8 (``keep_aspect``, resized as uint8) or float32.
        fov: (H, W) tensor, non-zero inside the field of view.
        input_size: (h, w) of the model's input.
        keep_aspect: resize with centred zero padding (Dual2Net) or stretch.

    Returns:
        float32 tensor (H, W).
    """
    import tensorflow as tf

    target_h, target_w = (int(s) for s in input_size)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if keep_aspect:
        # resize_pad: scale = min(th / H, tw / W), sides rounded half to even.
        scale = tf.minimum(target_h / _f64(height), target_w / _f64(width))

        def side(length, target):
            fitted = tf.maximum(tf.round(_f64(length) * scale), tf.constant(1.0, tf.float64))
            return tf.minimum(tf.cast(fitted, tf.int32), target)

        new_h, new_w = side(height, target_h), side(width, target_w)
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
        small = opencv_area_resize(image, new_h, new_w)
        small = tf.pad(
            small, [[top, target_h - new_h - top], [left, target_w - new_w - left], [0, 0]]
        )
    else:
        new_h, new_w, top, left = target_h, target_w, 0, 0
        small = opencv_area_resize(image, target_h, target_w)
    small = tf.ensure_shape(tf.cast(small, tf.float32), [target_h, target_w, 3])
    prob = tf.cast(predict_fn(small[None]), tf.float32)[0, :, :, 0]
    prob = _bilinear_resize(prob[top : top + new_h, left : left + new_w], height, width)
    prob = tf.clip_by_value(prob, 0.0, 1.0)
    return prob * tf.cast(tf.not_equal(fov, 0), tf.float32)


def lesion_map_graph(local_fn, image, patch: int, overlap: int, batch_size: int):
    """`rmib.grade.lesion_map` in TensorFlow ops: the local net over the grid, then M.

    Args:
        local_fn: (B, patch, patch, 3) float32 -> (B, K) class probabilities.
        image: (S, S, 3) float32 tensor, S known.
        patch, overlap: the grid (`rmib.grading.grid_positions`).
        batch_size: patches per call of `local_fn`.

    Returns:
        (weights M (S, S) float32, labels (n, n) int32, probs (n, n) float32).
    """
    import tensorflow as tf

    from rmib.grading import grid_positions
    from rmib.grading.lesion_map import _coverage

    size = int(image.shape[0])
    positions = np.asarray(grid_positions(size, patch, overlap))
    n = len(positions)
    starts = np.stack(np.meshgrid(positions, positions, indexing="ij"), -1).reshape(-1, 2)
    offsets = np.arange(patch)
    rows = tf.constant(starts[:, :1] + offsets[None, :], tf.int32)  # (n * n, patch)
    cols = tf.constant(starts[:, 1:] + offsets[None, :], tf.int32)
    total = n * n
    batches = -(-total // batch_size)

    def body(i, scores):
        chunk = tf.range(i * batch_size, tf.minimum((i + 1) * batch_size, total))
        patches = tf.gather(image, tf.gather(rows, chunk), axis=0)  # (b, patch, S, 3)
        patches = tf.gather(patches, tf.gather(cols, chunk), axis=2, batch_dims=1)
        patches = tf.ensure_shape(patches, [None, patch, patch, image.shape[-1]])
        return i + 1, scores.write(i, tf.cast(local_fn(patches), tf.float32))

    _, scores = tf.while_loop(
        lambda i, _: i < batches,
        body,
        [tf.constant(0), tf.TensorArray(tf.float32, size=batches, infer_shape=False)],
        parallel_iterations=1,
        name="grid_patches",
    )
    scores = scores.concat()
    labels = tf.argmax(scores, axis=1, output_type=tf.int32)
    probs = tf.clip_by_value(tf.reduce_max(scores, axis=1), 0.0, 1.0)
    # weighted_lesion_map: (A LP A^T) / (count count^T), in float64 as NumPy does.
    weights = (tf.cast(labels, tf.float64) + 1.0) * tf.cast(probs, tf.float64)
    coverage = tf.constant(_coverage(size, patch, overlap), tf.float64)
    count = tf.reduce_sum(coverage, axis=1)
    grid = tf.reshape(weights, [n, n])
    total_map = tf.matmul(tf.matmul(coverage, grid), coverage, transpose_b=True)
    weights_map = tf.cast(total_map / (count[:, None] * count[None, :]), tf.float32)
    return weights_map, tf.reshape(labels, [n, n]), tf.reshape(probs, [n, n])


def global_input_graph(image, size: int, weights=None):
    """`rmib.grade.global_input` in TensorFlow ops: I* = M / 4 * I (or I), resized, rounded."""
    import tensorflow as tf

    from rmib.grading.lesion_map import MAX_WEIGHT

    array = tf.cast(image, tf.float32)
    if weights is not None:
        array = (weights[:, :, None] / MAX_WEIGHT) * array
    # Square to square: resize_pad neither pads nor keeps anything but the size.
    resized = opencv_area_resize(array, size, size)
    return tf.ensure_shape(tf.cast(_to_uint8(resized), tf.float32), [size, size, 3])


# --------------------------------------------------------------------------- the archive


def _add_segment_image(archive, metadata, prob_fn):
    """The ``segment_image`` endpoint around `prob_fn(image uint8, fov uint8) -> (H, W)`."""
    import tensorflow as tf

    threshold = metadata["threshold"]

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
            image = tf.identity(image)
        prob = prob_fn(image, fov)
        return {"probability": prob, "mask": tf.cast(prob >= threshold, tf.uint8)}

    archive.add_endpoint(
        "segment_image",
        segment_image,
        input_signature=[
            tf.TensorSpec((None, None, 3), tf.uint8, name="image"),
            tf.TensorSpec((None, None), tf.uint8, name="fov"),
        ],
    )
    return ["segment_image"]


def _classifier_endpoints(archive, model, metadata):
    import tensorflow as tf

    size = metadata.get("image_size")

    def classify(images):
        return {"probability": _probability(model, images)}

    archive.add_endpoint(
        "classify",
        classify,
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="images")],
    )
    return ["classify"]


def _tiled_endpoints(archive, model, metadata, patch_size):
    import tensorflow as tf

    tile, overlap, batch_size = metadata["tile"], metadata["overlap"], metadata["tile_batch"]

    def segment_patch(tiles):
        return {"probability": _probability(model, tiles)}

    archive.add_endpoint(
        "segment_patch",
        segment_patch,
        input_signature=[
            tf.TensorSpec((None, patch_size, patch_size, 3), tf.float32, name="tiles")
        ],
    )

    def prob_fn(image, fov):
        image = tf.cast(image, tf.float32)
        return tiled_probability(
            lambda tiles: _probability(model, tiles), image, fov, tile, overlap, batch_size
        )[:, :, 0]

    return ["segment_patch", *_add_segment_image(archive, metadata, prob_fn)]


def _fused_endpoints(archive, model, metadata, patch_size):
    """The local-global U-Net: its parts called as `LocalGlobalSegmenter` calls them."""
    import tensorflow as tf

    global_trunk = model.get_layer("global_trunk")
    local_trunk = model.get_layer("local_trunk")
    crop = model.get_layer("fusion_crop")
    concat = model.get_layer("fusion_concat")
    head = model.get_layer("fusion_head")
    side = metadata["global_size"]
    tile, overlap, batch_size = metadata["tile"], metadata["overlap"], metadata["tile_batch"]

    def global_features(global_image):
        return tf.cast(global_trunk(global_image, training=False), tf.float32)

    def fused(tiles, boxes, features):
        local = local_trunk(tiles, training=False)
        cropped = crop([features, boxes, local])
        return tf.cast(head(concat([local, cropped]), training=False), tf.float32)

    def segment_patch(tiles, boxes, global_image):
        return {"probability": fused(tiles, boxes, global_features(global_image))}

    archive.add_endpoint(
        "segment_patch",
        segment_patch,
        input_signature=[
            tf.TensorSpec((None, patch_size, patch_size, 3), tf.float32, name="tiles"),
            tf.TensorSpec((None, 4), tf.float32, name="boxes"),
            tf.TensorSpec((None, side, side, 3), tf.float32, name="global_image"),
        ],
    )

    def prob_fn(image, fov):
        image = tf.cast(image, tf.float32)
        small = tf.ensure_shape(opencv_area_resize(image, side, side), [side, side, 3])
        features = global_features(small[None])  # once per photograph
        return tiled_probability(
            lambda tiles, boxes: fused(tiles, boxes, features),
            image,
            fov,
            tile,
            overlap,
            batch_size,
            with_boxes=True,
        )[:, :, 0]

    return ["segment_patch", *_add_segment_image(archive, metadata, prob_fn)]


def _resized_endpoints(archive, model, metadata):
    import tensorflow as tf

    height, width = metadata["input_size"]
    keep_aspect = metadata["resize"]["keep_aspect"]

    def segment_resized(images):
        return {"probability": _probability(model, images)}

    archive.add_endpoint(
        "segment_resized",
        segment_resized,
        input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name="images")],
    )

    def prob_fn(image, fov):
        if not keep_aspect:  # GlobalNet alone: the float32 photograph is resized
            image = tf.cast(image, tf.float32)
        return resized_probability(
            lambda batch: _probability(model, batch), image, fov, (height, width), keep_aspect
        )

    return ["segment_resized", *_add_segment_image(archive, metadata, prob_fn)]


def _grader_endpoints(archive, grader, metadata):
    """The two-stage grader: both nets, the baseline, and the whole pipeline."""
    import tensorflow as tf

    size, patch, overlap = metadata["image_size"], metadata["patch_size"], metadata["overlap"]
    side, batch_size = metadata["global_size"], metadata["patch_batch"]
    local_net, global_net = grader.local_net, grader.global_net
    plain_net = grader.plain_net if metadata.get("baseline") else None
    global_spec = tf.TensorSpec((None, side, side, 3), tf.float32, name="images")

    def grades(net, images):
        probabilities = _probability(net, images)
        return {
            "probabilities": probabilities,
            "grade": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        }

    archive.add_endpoint(
        "classify", lambda images: grades(global_net, images), input_signature=[global_spec]
    )

    def classify_patch(patches):
        probabilities = _probability(local_net, patches)
        return {
            "probabilities": probabilities,
            "label": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        }

    archive.add_endpoint(
        "classify_patch",
        classify_patch,
        input_signature=[tf.TensorSpec((None, patch, patch, 3), tf.float32, name="patches")],
    )
    names = ["classify", "classify_patch"]

    def grade_image(image):
        image = tf.cast(image, tf.float32)
        weights, labels, probs = lesion_map_graph(
            lambda patches: _probability(local_net, patches), image, patch, overlap, batch_size
        )
        weighted = global_input_graph(image, side, weights)
        out = grades(global_net, weighted[None])
        result = {
            "probabilities": out["probabilities"][0],
            "grade": out["grade"][0],
            "weights": weights,
            "labels": labels,
            "patch_probabilities": probs,
        }
        if plain_net is not None:
            plain = grades(plain_net, global_input_graph(image, side)[None])
            result.update(
                plain_probabilities=plain["probabilities"][0], plain_grade=plain["grade"][0]
            )
        return result

    archive.add_endpoint(
        "grade_image",
        grade_image,
        input_signature=[tf.TensorSpec((size, size, 3), tf.uint8, name="image")],
    )
    names.append("grade_image")
    if plain_net is not None:
        archive.add_endpoint(
            "classify_plain",
            lambda images: grades(plain_net, images),
            input_signature=[global_spec],
        )
        names.append("classify_plain")
    return names


def build_export_archive(model, metadata: dict, patch_size: int | None = None):
    """A `keras.export.ExportArchive` with the serving signatures of `metadata["kind"]`.

    Args:
        model: the trained Keras model, or for a grader the `rmib.grade.Grader`.
        metadata: what `export_metadata` returned.
        patch_size: fix the tile side of ``segment_patch`` (TFLite needs
            static channel counts, which unknown tile sides hide); None: any.

    Returns:
        (archive, names of the signatures).
    """
    import keras
    import tensorflow as tf

    kind = metadata.get("kind") or serving_kind(metadata["run"])
    # No archive.track(model): the endpoints track every variable they use,
    # and tracking the model as well saves each weight twice (Keras 3.15
    # stores the Keras variables beside the tf.Variables the endpoints hold).
    archive = keras.export.ExportArchive()
    if kind == "grader":
        names = _grader_endpoints(archive, model, metadata)
    else:
        if kind == "classifier":
            names = _classifier_endpoints(archive, model, metadata)
        elif kind == "tiled":
            names = _tiled_endpoints(archive, model, metadata, patch_size)
        elif kind == "fused":
            names = _fused_endpoints(archive, model, metadata, patch_size)
        else:
            names = _resized_endpoints(archive, model, metadata)
    metadata_json = json.dumps(metadata, indent=2, default=str)

    def metadata_fn():
        return {"json": tf.constant(metadata_json)}

    archive.add_endpoint("metadata", metadata_fn, input_signature=[])
    return archive, names


# --------------------------------------------------------------------------- checks


@dataclasses.dataclass
class _Case:
    """One call of a signature on sample inputs and what rmib's Python code gives for it."""

    signature: str
    inputs: dict
    expected: dict


def make_reference_segmenter(model, metadata: dict):
    """The `rmib.inference.segmenter.Segmenter` that `rmib predict` would use with the export's tiling."""
    from rmib.tasks import make_segmenter

    return make_segmenter(
        model,
        metadata["run"],
        tile=metadata.get("tile"),
        overlap=metadata.get("overlap"),
        batch_size=metadata.get("tile_batch"),
    )


def _sample_photograph(metadata: dict, seed: int = 0):
    """A synthetic photograph through the run's preprocessing: (image, fov).

    Several tiles of the tiled kinds (an edge tile flush with the border),
    larger than the model's input of the resized kinds, odd-sized.
    """
    from rmib.data import synthetic
    from rmib.data.pipeline import Preprocessing, preprocess_array

    kind = metadata["kind"]
    if kind == "grader":
        side = metadata["image_size"] * 5 // 4
        shape = (side + 7, side + 20)
    elif kind == "resized":
        height, width = metadata["input_size"]
        shape = (height * 5 // 4 + 7, width * 5 // 4 + 13)
    else:
        side = max(64, metadata["tile"] * 3 // 2 + 7)
        shape = (side, side + 13)
    photograph, _, _ = synthetic.synthesize_fundus(shape, seed=seed)
    prep = dataclasses.replace(
        Preprocessing.from_dict(metadata["preprocessing"]), centre_crop=False
    )
    image, _, fov = preprocess_array(photograph, prep)
    return image, fov


def _batch_cases(model, metadata: dict, patch_size: int | None = None, seed: int = 0) -> list:
    """Random inputs of the batch signature(s), with the Keras models' outputs."""
    rng = np.random.default_rng(seed)
    kind = metadata["kind"]

    def uniform(*shape):
        return rng.uniform(0, 255, shape).astype(np.float32)

    if kind == "classifier":
        images = uniform(2, metadata["image_size"], metadata["image_size"], 3)
        return [_Case("classify", {"images": images}, {"probability": _probability(model, images)})]
    if kind == "grader":
        side, patch = metadata["global_size"], metadata["patch_size"]
        nets = {"classify": model.global_net}
        if metadata.get("baseline"):
            nets["classify_plain"] = model.plain_net
        cases = []
        for name, net in nets.items():
            images = uniform(2, side, side, 3)
            cases.append(
                _Case(name, {"images": images}, {"probabilities": _probability(net, images)})
            )
        patches = uniform(3, patch, patch, 3)
        expected = {"probabilities": _probability(model.local_net, patches)}
        return [*cases, _Case("classify_patch", {"patches": patches}, expected)]
    if kind == "resized":
        height, width = metadata["input_size"]
        images = uniform(2, height, width, 3)
        expected = {"probability": _probability(model, images)}
        return [_Case("segment_resized", {"images": images}, expected)]
    patch = patch_size or 2 * metadata["size_multiple"]
    tiles = uniform(2, patch, patch, 3)
    if kind == "tiled":
        return [
            _Case("segment_patch", {"tiles": tiles}, {"probability": _probability(model, tiles)})
        ]
    # fused: the whole Keras model, one global image per tile (box b reads map b).
    side = metadata["global_size"]
    boxes = np.array([[0.0, 0.0, 0.5, 0.4], [0.3, 0.55, 0.8, 0.95]], np.float32)
    global_image = uniform(1, side, side, 3)
    out = _fused_local(
        model, {"global_image": np.repeat(global_image, 2, axis=0), "patch": tiles, "box": boxes}
    )
    inputs = {"tiles": tiles, "boxes": boxes, "global_image": global_image}
    return [_Case("segment_patch", inputs, {"probability": out})]


def _fused_local(model, inputs: dict) -> np.ndarray:
    """The fused model's "local" output on `inputs`, run in a graph as `_probability`."""
    import tensorflow as tf

    @tf.function
    def run(inputs):
        return tf.cast(model(inputs, training=False)["local"], tf.float32)

    return run({k: tf.convert_to_tensor(v) for k, v in inputs.items()}).numpy()


def _image_case(model, metadata: dict) -> _Case:
    """``segment_image`` / ``grade_image`` on a synthetic photograph, with rmib's own answer."""
    image, fov = _sample_photograph(metadata)
    if metadata["kind"] == "grader":
        result = model.grade_prepared(image)
        expected = {
            "probabilities": result.probs,
            "weights": result.lesion_map.weights,
            "grade": result.grade,
        }
        if metadata.get("baseline"):
            expected.update(plain_probabilities=result.plain_probs, plain_grade=result.plain_grade)
        return _Case("grade_image", {"image": image}, expected)
    segmenter = make_reference_segmenter(model, metadata)
    expected = {"probability": segmenter.predict_prepared(image, fov)}
    return _Case("segment_image", {"image": image, "fov": fov}, expected)


def _max_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise RmibError(f"export check: output shape {a.shape} differs from the model's {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _compare(path, case: _Case, served: dict, metadata: dict) -> float:
    """Max abs difference of the float outputs; the integer ones must agree (but at near ties)."""
    tolerance = _tolerance(metadata)
    difference = 0.0
    for name, expected in case.expected.items():
        got = np.asarray(served[name])
        if name in ("grade", "plain_grade"):
            probs = np.sort(np.asarray(case.expected[name.replace("grade", "probabilities")]))
            if int(got) != int(expected) and probs[-1] - probs[-2] >= tolerance:
                raise RmibError(f"export check failed: {path}: {case.signature} {name} differs")
            continue
        difference = max(difference, _max_difference(got, expected))
    if case.signature == "segment_image":
        expected = case.expected["probability"]
        mask = (expected >= metadata["threshold"]).astype(np.uint8)
        near = np.abs(expected - metadata["threshold"]) < tolerance
        if np.any((np.asarray(served["mask"]) != mask) & ~near):
            raise RmibError(f"export check failed: {path}: segment_image mask differs")
    return difference


def check_savedmodel(path, model, metadata: dict) -> dict:
    """Reload a SavedModel with `tf.saved_model.load`; compare it with rmib's own prediction.

    The batch signatures get random inputs and are compared with the Keras
    models; ``segment_image`` gets a synthetic photograph through the run's
    preprocessing and is compared with the run's `rmib.inference.segmenter.Segmenter`
    (what `rmib predict` runs), its mask with the thresholded reference;
    ``grade_image`` is compared with `rmib.grade.Grader.grade_prepared` (what
    `rmib grade predict` runs); the `metadata` signature with `metadata`.

    Args:
        path: the SavedModel folder.
        model: the Keras model, or for a grader the `rmib.grade.Grader`.
        metadata: what `export_metadata` returned.

    Returns:
        signature -> max abs difference on the sample inputs.

    Raises:
        RmibError: a difference of `CHECK_TOLERANCE` or more, a different mask
            or grade, or metadata that does not read back.
    """
    import tensorflow as tf

    cases = _batch_cases(model, metadata)
    if metadata["kind"] != "classifier":
        cases.append(_image_case(model, metadata))
    loaded = tf.saved_model.load(str(path))
    differences = {}
    for case in cases:
        served = loaded.signatures[case.signature](
            **{name: tf.constant(value) for name, value in case.inputs.items()}
        )
        served = {name: value.numpy() for name, value in served.items()}
        differences[case.signature] = _compare(path, case, served, metadata)
    stored = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode("utf-8"))
    if stored != json.loads(json.dumps(metadata, default=str)):
        raise RmibError(f"export check failed: {path}: the stored metadata does not read back")
    _raise_if_different(path, differences, metadata)
    return differences


def check_tflite(path, model, metadata: dict) -> dict:
    """Run a `.tflite` export with the TFLite interpreter; compare it with the Keras model."""
    import tensorflow as tf

    key = batch_signature(metadata)
    (case,) = [c for c in _batch_cases(model, metadata, metadata.get("tile")) if c.signature == key]
    with warnings.catch_warnings():  # tf.lite.Interpreter's move to ai_edge_litert
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(key)
    served = runner(**case.inputs)
    differences = {key: _compare(path, case, served, metadata)}
    _raise_if_different(path, differences, metadata)
    return differences


def check_keras(path, model, metadata: dict, unsafe: bool = False) -> dict:
    """Reload a copied `.keras` file and compare it with the original model."""
    from rmib import training

    copy = training.load_model(path, unsafe=unsafe)
    differences = {}
    for case in _batch_cases(model, metadata):
        if metadata["kind"] == "fused":
            tiles, boxes = case.inputs["tiles"], case.inputs["boxes"]
            inputs = {
                "global_image": np.repeat(case.inputs["global_image"], len(tiles), axis=0),
                "patch": tiles,
                "box": boxes,
            }
            served = {"probability": _fused_local(copy, inputs)}
        else:
            (batch,) = case.inputs.values()
            served = {"probability": _probability(copy, batch)}
        differences[case.signature] = _compare(path, case, served, metadata)
    _raise_if_different(path, differences, metadata)
    return differences


def _tolerance(metadata: dict) -> float:
    from rmib.precision import check_tolerance

    return check_tolerance(metadata.get("precision", "float32"))


def _raise_if_different(path, differences: dict, metadata: dict) -> None:
    tolerance = _tolerance(metadata)
    bad = {k: v for k, v in differences.items() if not v < tolerance}
    if bad:
        text = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
        raise RmibError(
            f"export check failed: {path}: max abs difference from rmib's own prediction {text} "
            f"(tolerance {tolerance:g} for {metadata.get('precision', 'float32')}); "
            "the export was not written"
        )


# --------------------------------------------------------------------------- export


def _read_run(model_path, format: str, tile, overlap) -> tuple[dict, str]:
    """(run metadata, kind), refusing what cannot be exported before any model is loaded."""
    from rmib import training

    metadata = training.read_run_metadata(model_path)
    try:
        kind = serving_kind(metadata)
    except RmibError as exc:
        raise RmibError(f"{model_path}: {exc}") from None
    if kind == "grader" and not Path(model_path).is_dir():
        raise RmibError(
            f"{model_path}: one network of a grading run; rmib export takes the run "
            "directory of `rmib grade train` (it exports both networks together)"
        )
    if kind == "grader" and format == "keras":
        raise RmibError(
            f"{model_path}: a grading run has two networks (local_net.keras, "
            "global_net.keras); --format keras copies one model file: copy them from the run "
            "directory, or export a SavedModel"
        )
    if kind not in ("tiled", "fused") and (tile is not None or overlap is not None):
        what = {
            "classifier": "a classifier",
            "resized": "a model that predicts the resized photograph whole",
            "grader": "a grader",
        }[kind]
        raise RmibError(f"--tile and --overlap apply to tiled segmenters, not to {what}")
    if overlap is not None and not 0 <= float(overlap) < 1:
        raise RmibError(f"--overlap must be in [0, 1), got {overlap}")
    return metadata, kind


def _load(model_path, kind: str, unsafe: bool):
    """The Keras model; for a grading run its `rmib.grade.Grader`, every network loaded."""
    from rmib import training

    if kind != "grader":
        return training.load_model(model_path, unsafe=unsafe)
    from rmib.grade import Grader

    grader = Grader.load(model_path, unsafe=unsafe)
    grader.local_net, grader.global_net  # noqa: B018 - load now: fail before writing
    if grader.metadata.get("baseline"):
        grader.plain_net  # noqa: B018
    return grader


def _tiling(kind: str, model, metadata: dict, tile, overlap, batch_size):
    """(tile, overlap, batch size) of ``segment_image``: `rmib predict`'s, with the overrides.

    An encoder-decoder run whose `rmib predict` plans large tiles per photograph
    (``predict_tile = "auto"``) exports fixed `EXPORT_TILE`-px tiles unless
    --tile says otherwise.
    """
    if kind not in ("tiled", "fused"):
        return None, None, None
    from rmib.inference.segmenter import AUTO_TILE, EXPORT_TILE
    from rmib.tasks import make_segmenter

    if kind == "tiled" and tile is None and _planned_tiles(metadata):
        # rmib predict plans large tiles per photograph ("auto"); the graph of
        # segment_image tiles with fixed square tiles, the same for every photograph.
        tile = EXPORT_TILE
    segmenter = make_segmenter(model, metadata, tile=tile, overlap=overlap, batch_size=batch_size)
    if segmenter.tile == AUTO_TILE:  # pragma: no cover - resolved above
        raise RmibError("segment_image needs a fixed tile side: pass --tile")
    return segmenter.tile, segmenter.overlap, segmenter.batch_size


def _planned_tiles(metadata: dict) -> bool:
    """Does `rmib predict` plan the tiles of this encoder-decoder run ("auto")?"""
    return metadata.get("predict_tile") in (None, "auto")


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
    precision: str | None = None,
) -> ExportResult:
    """Export a trained rmib model; written atomically (a failed export leaves no trace).

    Every model rmib trains exports: classifiers (`rmib pretrain`), the
    encoder-decoder, local-global and Dual2Net segmenters (`rmib segment`)
    and the two-stage grader (`rmib grade train`, SavedModel only); see the
    module docstring for each kind's signatures.

    Args:
        model_path: a run directory of `rmib pretrain`, `rmib segment` or
            `rmib grade train`, or the `.keras` file of a classifier or segmenter.
        out: the SavedModel folder, `.keras` file or `.tflite` file to write.
        format: "savedmodel", "keras" or "tflite" (the batch signature:
            ``classify``, ``segment_patch`` or ``segment_resized``).
        check: reload the export and compare it with rmib's own prediction
            on sample inputs; a max abs difference of `CHECK_TOLERANCE` or
            more is an error and nothing is written.
        unsafe: allow models with Lambda layers (`--unsafe-load`).
        tile, overlap, batch_size: tiling of ``segment_image`` (tiled
            segmenters); default what `rmib predict` uses for the run.
        precision: what the SavedModel or TFLite graph computes in, one of
            `rmib.precision.PREDICT_PRECISIONS`; None: float32 (portable, and
            as accurate as the weights allow). The check compares with rmib's
            own prediction in the same precision, within
            `rmib.precision.check_tolerance` of it. A ``keras`` copy keeps the
            precision the model was trained in (None only).

    Returns:
        An `ExportResult`.

    Raises:
        RmibError: not an rmib model, a model type rmib cannot export, a
            format the model has no file for (``keras`` of a grader), a bad
            tile or overlap (or one given to a model that does not tile), a
            failed TFLite conversion (naming the op) or a failed check.

    Example:
        >>> export_model("runs/ex", "exports/ex", check=True).differences
        {'segment_patch': 1.2e-07, 'segment_image': 2.4e-07}
    """
    if format not in EXPORT_FORMATS:
        raise RmibError(f"unknown export format {format!r}; expected {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    run_metadata, kind = _read_run(model_path, format, tile, overlap)
    if format == "keras" and precision is not None:
        raise RmibError(
            "--precision applies to savedmodel and tflite exports; a .keras copy keeps the "
            f"precision the model was trained in ({run_metadata.get('precision', 'float32')})"
        )
    resolved = _export_precision(precision, run_metadata)
    model = _load(model_path, kind, unsafe)
    if format == "keras":
        resolved = _model_precision(model)
    else:
        _set_precision(model, resolved)
    tile, overlap, batch_size = _tiling(kind, model, run_metadata, tile, overlap, batch_size)
    metadata = export_metadata(run_metadata, tile, overlap, batch_size, precision=resolved)
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
    return ExportResult(out, format, names, differences, metadata, resolved, _tolerance(metadata))


def _export_precision(precision: str | None, run_metadata: dict) -> str:
    """The policy an export computes in; mixed_float16 is allowed without a GPU (for a GPU server)."""
    from rmib.precision import PREDICT_DEFAULT, resolve_predict_precision

    resolved, _ = resolve_predict_precision(
        precision or PREDICT_DEFAULT, run_metadata.get("precision"), allow_slow=True
    )
    return resolved


def _networks(model) -> list:
    """The Keras models of an export: the model, or a grader's loaded networks."""
    import keras

    if isinstance(model, keras.Model):
        return [model]
    return [net for net in model._models.values() if isinstance(net, keras.Model)]


def _set_precision(model, precision: str) -> None:
    from rmib.precision import with_precision

    for net in _networks(model):
        with_precision(net, precision)


def _model_precision(model) -> str:
    from rmib.precision import model_precision

    return model_precision(_networks(model)[0])


__all__ = [
    "CHECK_TOLERANCE",
    "EXPORT_FORMATS",
    "KINDS",
    "ExportResult",
    "batch_signature",
    "build_export_archive",
    "check_keras",
    "check_savedmodel",
    "check_tflite",
    "export_metadata",
    "export_model",
    "global_input_graph",
    "lesion_map_graph",
    "make_reference_segmenter",
    "opencv_area_resize",
    "resized_probability",
    "serving_kind",
    "tiled_probability",
]
