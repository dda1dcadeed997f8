"""The serving signatures every segmenter shares: ``segment_image`` and two batch shapes.

A segmentation method's export (`rmib/methods/<method>/export.py`) builds on
`SegmenterExporter`: ``segment_image(image, fov)`` serves a whole photograph
as the method's `rmib.inference.segmenter.Segmenter` predicts it, and the
check compares the two. Two shapes of model need nothing more than a
constructor call: `TiledExporter` (a model over tiles, ``segment_patch``,
the photograph tiled in the graph by `rmib.inference.tiling_tf`) and
`ResizedExporter` (a model over the photograph resized to its input size,
``segment_resized``, resized in the graph by `rmib.export.opencv_resize`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.errors import RmibError
from rmib.export.archive import (
    CALLER_PREPROCESSING,
    DEFAULT_THRESHOLD,
    FOV_CROP_PREPROCESSING,
    Exporter,
    probability,
    spec,
)
from rmib.export.checks import Case, sample_photograph
from rmib.export.opencv_resize import bilinear_resize, opencv_area_resize
from rmib.inference.segmenter import AUTO_TILE
from rmib.inference.tiling import WINDOW_FLOOR
from rmib.inference.tiling_tf import tiled_probability, tta_probability

PROBABILITY_MAP = {
    "probability": spec(
        "float32", [None, "h", "w", 1], "lesion probability per pixel of each input"
    )
}


def segment_image_docs(how: str) -> dict:
    """The documentation of ``segment_image``; `how` says how the probability is computed."""
    return {
        "inputs": {
            "image": spec(
                "uint8",
                ["H", "W", 3],
                "one whole photograph after the preprocessing named in 'preprocessing' "
                "(see caller_preprocessing)",
            ),
            "fov": spec(
                "uint8",
                ["H", "W"],
                "field-of-view mask 0/1 of that photograph; shape (0, 0) for no masking",
            ),
        },
        "outputs": {
            "probability": spec(
                "float32",
                ["H", "W"],
                f"lesion probability, {how}, averaged over the test-time flips named in "
                "'tta' (none: one pass), 0 outside the field of view",
            ),
            "mask": spec("uint8", ["H", "W"], "probability >= threshold, 0/1"),
        },
    }


def add_segment_image(archive, metadata: dict, prob_fn) -> list:
    """The ``segment_image`` endpoint around `prob_fn(image uint8, fov uint8) -> (H, W)`.

    With the metadata's ``tta`` (the run's test-time augmentation, as `rmib predict`
    applies it) the map is the mean of `prob_fn` over the flipped (turned) photograph.
    """
    threshold = metadata["threshold"]
    tta = metadata.get("tta", "none")

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
        prob = tta_probability(prob_fn, image, fov, tta)
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


def tiling_metadata(tiling: tuple, size_multiple: int) -> dict:
    """The export metadata of a ``segment_image`` that tiles: tile, overlap, batch, window."""
    tile, overlap, batch_size = tiling
    return {
        "tile": int(tile),
        "overlap": float(overlap),
        "tile_batch": int(batch_size),
        "size_multiple": int(size_multiple),
        "window": {"kind": "separable gaussian", "sigma_fraction": 0.125, "floor": WINDOW_FLOOR},
    }


def uniform_images(rng, *shape) -> np.ndarray:
    """Random float32 images in [0, 255]: the sample inputs of the batch signatures."""
    return rng.uniform(0, 255, shape).astype(np.float32)


class SegmenterExporter(Exporter):
    """A segmenter's export: its metadata, ``segment_image`` and its check.

    Args:
        model_type: the method's name ("model" in the metadata).
        segmenter: ``segmenter(model, run_metadata, tile, overlap, batch_size)``
            -> the method's `rmib.inference.segmenter.Segmenter` (what `rmib
            predict` runs), with the export's tiling.
        fields: more fields of the export metadata (e.g. a local-global run's
            "network"), after "model" and "lesion".
    """

    def __init__(self, model_type: str, segmenter, fields: dict | None = None):
        self.model_type = model_type
        self.segmenter = segmenter
        self.fields = dict(fields or {})

    def tiling(self, model, run_metadata, tile, overlap, batch_size):
        if not self.tiles:
            return None, None, None
        segmenter = self.segmenter(model, run_metadata, tile, overlap, batch_size)
        if segmenter.tile == AUTO_TILE:  # pragma: no cover - a method exports fixed tiles
            raise RmibError("segment_image needs a fixed tile side: pass --tile")
        return segmenter.tile, segmenter.overlap, segmenter.batch_size

    def metadata(self, run_metadata, preprocessing, tiling):
        return {
            "threshold": float(run_metadata.get("threshold", DEFAULT_THRESHOLD)),
            "model": self.model_type,
            "lesion": run_metadata.get("lesion"),
            # segment_image averages over these test-time flips, as rmib predict does.
            "tta": run_metadata.get("tta", "none"),
            **self.fields,
        }

    def caller_preprocessing(self, preprocessing):
        return FOV_CROP_PREPROCESSING if preprocessing.get("fov_crop") else CALLER_PREPROCESSING

    def sample_shape(self, metadata: dict) -> tuple:
        """(H, W) of the check's photograph: several tiles, or larger than the model's input."""
        side = max(64, metadata["tile"] * 3 // 2 + 7)
        return side, side + 13

    def image_case(self, model, metadata):
        image, fov = sample_photograph(metadata["preprocessing"], self.sample_shape(metadata))
        segmenter = self.segmenter(
            model,
            metadata["run"],
            metadata.get("tile"),
            metadata.get("overlap"),
            metadata.get("tile_batch"),
        )
        expected = {"probability": segmenter.predict_prepared(image, fov)}
        inputs = {"image": image, "fov": fov}
        return Case("segment_image", inputs, expected, thresholded={"mask": "probability"})


class TiledExporter(SegmenterExporter):
    """A model over tiles: ``segment_patch(tiles)``; ``segment_image`` tiles the photograph.

    Args:
        model_type, segmenter, fields: as `SegmenterExporter`.
        size_multiple: the tile sides the model takes are multiples of it.
    """

    kind = "tiled"
    batch_signature = "segment_patch"
    tiles = True

    def __init__(self, model_type, segmenter, size_multiple: int, fields=None):
        super().__init__(model_type, segmenter, fields)
        self.size_multiple = int(size_multiple)

    def metadata(self, run_metadata, preprocessing, tiling):
        meta = super().metadata(run_metadata, preprocessing, tiling)
        return {**meta, **tiling_metadata(tiling, self.size_multiple)}

    def signature_docs(self, metadata):
        tiles = spec(
            "float32",
            [None, "h", "w", 3],
            "preprocessed RGB tiles in [0, 255]; h, w multiples of size_multiple",
        )
        return {
            "segment_patch": {"inputs": {"tiles": tiles}, "outputs": PROBABILITY_MAP},
            "segment_image": segment_image_docs("tiles blended with a Gaussian window"),
        }

    def add_endpoints(self, archive, model, metadata, patch_size=None):
        tile, overlap, batch_size = metadata["tile"], metadata["overlap"], metadata["tile_batch"]

        def segment_patch(tiles):
            return {"probability": probability(model, tiles)}

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
                lambda tiles: probability(model, tiles), image, fov, tile, overlap, batch_size
            )[:, :, 0]

        return ["segment_patch", *add_segment_image(archive, metadata, prob_fn)]

    def batch_cases(self, model, metadata, patch_size=None, seed=0):
        patch = patch_size or 2 * metadata["size_multiple"]
        tiles = uniform_images(np.random.default_rng(seed), 2, patch, patch, 3)
        expected = {"probability": probability(model, tiles)}
        return [Case("segment_patch", {"tiles": tiles}, expected)]


def resized_probability(predict_fn, image, fov, input_size, keep_aspect: bool):
    """Predict a whole photograph on a resized copy, as the "resized" segmenters do.

    ``keep_aspect`` (Dual2Net): `rmib.data.fundus.resize_pad` of the uint8
    photograph to `input_size`, the model, the unpadded part resized back
    (bilinear), clipped to [0, 1], 0 outside the field of view. Not
    ``keep_aspect`` (GlobalNet alone): the float32 photograph resized to
    `input_size`, aspect not kept, then the same.

    Args:
        predict_fn: (1, h, w, 3) float32 -> (1, h, w, 1) float32.
        image: (H, W, 3) tensor: uint8 (``keep_aspect``, resized as uint8) or float32.
        fov: (H, W) tensor, non-zero inside the field of view.
        input_size: (h, w) of the model's input.
        keep_aspect: resize with centred zero padding, or stretch.

    Returns:
        float32 tensor (H, W).
    """
    target_h, target_w = (int(s) for s in input_size)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if keep_aspect:
        # resize_pad: scale = min(th / H, tw / W), sides rounded half to even.
        scale = tf.minimum(
            target_h / tf.cast(height, tf.float64), target_w / tf.cast(width, tf.float64)
        )

        def side(length, target):
            fitted = tf.round(tf.cast(length, tf.float64) * scale)
            fitted = tf.maximum(fitted, tf.constant(1.0, tf.float64))
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
    prob = bilinear_resize(prob[top : top + new_h, left : left + new_w], height, width)
    prob = tf.clip_by_value(prob, 0.0, 1.0)
    return prob * tf.cast(tf.not_equal(fov, 0), tf.float32)


class ResizedExporter(SegmenterExporter):
    """A model over the resized photograph: ``segment_resized(images)``; ``segment_image``
    resizes the photograph to the model's input size and the map back.

    Args:
        model_type, segmenter, fields: as `SegmenterExporter`.
        resize: the method's resize rule, stored in the metadata: "input_size"
            [h, w], "size_multiple" and "resize" (with "keep_aspect": resize
            with centred zero padding, or stretch; see `resized_probability`).
    """

    kind = "resized"
    batch_signature = "segment_resized"
    description = "a model that predicts the resized photograph whole"

    def __init__(self, model_type, segmenter, resize: dict, fields=None):
        super().__init__(model_type, segmenter, fields)
        self.resize = dict(resize)

    def metadata(self, run_metadata, preprocessing, tiling):
        return {**super().metadata(run_metadata, preprocessing, tiling), **self.resize}

    def signature_docs(self, metadata):
        height, width = metadata.get("input_size") or ("h", "w")
        images = spec(
            "float32",
            [None, height, width, 3],
            "preprocessed photographs resized to the model's input size (see 'resize'), "
            "in [0, 255]",
        )
        outputs = {
            "probability": spec("float32", [None, height, width, 1], "lesion probability per pixel")
        }
        how = "predicted on the photograph resized to the model's size, resized back (bilinear)"
        return {
            "segment_resized": {"inputs": {"images": images}, "outputs": outputs},
            "segment_image": segment_image_docs(how),
        }

    def add_endpoints(self, archive, model, metadata, patch_size=None):
        height, width = metadata["input_size"]
        keep_aspect = metadata["resize"]["keep_aspect"]

        def segment_resized(images):
            return {"probability": probability(model, images)}

        archive.add_endpoint(
            "segment_resized",
            segment_resized,
            input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name="images")],
        )

        def prob_fn(image, fov):
            if not keep_aspect:  # the float32 photograph is resized
                image = tf.cast(image, tf.float32)
            return resized_probability(
                lambda batch: probability(model, batch), image, fov, (height, width), keep_aspect
            )

        return ["segment_resized", *add_segment_image(archive, metadata, prob_fn)]

    def batch_cases(self, model, metadata, patch_size=None, seed=0):
        height, width = metadata["input_size"]
        images = uniform_images(np.random.default_rng(seed), 2, height, width, 3)
        expected = {"probability": probability(model, images)}
        return [Case("segment_resized", {"images": images}, expected)]

    def sample_shape(self, metadata):
        height, width = metadata["input_size"]
        return height * 5 // 4 + 7, width * 5 // 4 + 13


__all__ = [
    "PROBABILITY_MAP",
    "ResizedExporter",
    "SegmenterExporter",
    "TiledExporter",
    "add_segment_image",
    "resized_probability",
    "segment_image_docs",
    "tiling_metadata",
    "uniform_images",
]
