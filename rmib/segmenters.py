"""Whole-photograph prediction for every segmentation model rmib trains.

A `Segmenter` wraps a trained Keras model with the metadata of its run
(lesion, preprocessing, model type) and turns a photograph of any size into a
full-resolution probability map. Each model type registers how it predicts:
the encoder-decoder by overlapping tiles (`rmib.inference.predict_tiled`),
the local-global U-Net by tiles that also see the global features, Dual2Net
on the resized photograph.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.data import fundus
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.errors import RmibError
from rmib.inference import predict_tiled

SEGMENTER_TYPES: dict = {}


def register_segmenter(model_type):
    """Class decorator: `model_type` (as stored in rmib.json "model") -> Segmenter class."""

    def wrap(cls):
        SEGMENTER_TYPES[model_type] = cls
        cls.model_type = model_type
        return cls

    return wrap


class Segmenter:
    """Base class: preprocessing, restoring the original geometry, FOV masking.

    Args:
        model: the trained Keras model.
        metadata: the run's rmib.json dict (lesion, preprocessing, sizes ...).
        tile, overlap, batch_size: tiling parameters (subclasses that tile).
    """

    model_type = "base"

    def __init__(self, model, metadata, tile=None, overlap=None, batch_size=None):
        self.model = model
        self.metadata = dict(metadata or {})
        self.lesion = self.metadata.get("lesion")
        self.preprocessing = Preprocessing.from_dict(self.metadata.get("preprocessing"))
        self.tile = tile
        self.overlap = overlap
        self.batch_size = batch_size

    def predict_prepared(self, image: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
        """Probability map (H, W) float32 for an already preprocessed image (H, W, 3)."""
        raise NotImplementedError

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probability map (H, W) float32 for a raw uint8 RGB photograph of any size."""
        prepared, _, fov = preprocess_array(image, self.preprocessing)
        prob = self.predict_prepared(prepared, fov)
        if prob.shape[:2] != image.shape[:2]:  # the IDRiD centre crop was applied
            full = np.zeros(image.shape[:2], np.float32)
            y0, x0, _, _ = fundus.idrid_centre_box(image.shape[:2])
            full[y0 : y0 + prob.shape[0], x0 : x0 + prob.shape[1]] = prob
            prob = full
        return prob


def _compiled_predict(model, channels=3):
    @tf.function(input_signature=[tf.TensorSpec((None, None, None, channels), tf.float32)])
    def predict(batch):
        out = model(batch, training=False)
        if isinstance(out, dict):
            out = out[sorted(out)[0]]
        if isinstance(out, (list, tuple)):
            out = out[0]
        return tf.cast(out, tf.float32)

    return predict


@register_segmenter("encoder-decoder")
class TiledSegmenter(Segmenter):
    """A fully convolutional segmenter applied to overlapping tiles.

    The tile may be much larger than the training patch: the network is fully
    convolutional, so a 512-px tile costs the same per pixel as a 160-px one
    while the overlap needed for seamless blending becomes a small fraction.
    """

    def __init__(self, model, metadata, tile=None, overlap=None, batch_size=None):
        super().__init__(model, metadata, tile, overlap, batch_size)
        multiple = int(self.metadata.get("size_multiple", 32))
        self.tile = int(tile or self.metadata.get("predict_tile", 512))
        if self.tile % multiple:
            raise RmibError(f"--tile must be a multiple of {multiple}, got {self.tile}")
        self.overlap = 0.125 if overlap is None else float(overlap)
        self.batch_size = int(batch_size or 2)
        self._predict = _compiled_predict(model)

    def predict_prepared(self, image, fov=None):
        # The image goes in as it is (uint8): predict_tiled casts each batch of
        # tiles to float32, so no float copy of the whole photograph is made.
        out = predict_tiled(
            lambda tiles: self._predict(tf.convert_to_tensor(tiles, tf.float32)),
            np.asarray(image),
            tile=self.tile,
            overlap=self.overlap,
            batch_size=self.batch_size,
            mask=None if fov is None else np.asarray(fov),
        )
        return out[..., 0]


def load_segmenter(
    model_path, *, unsafe=False, tile=None, overlap=None, batch_size=None, **overrides
):
    """Load a run directory or `.keras` file as a Segmenter.

    Args:
        model_path: run directory or `.keras` file.
        unsafe: allow models that need Keras unsafe deserialization (Lambda layers).
        tile, overlap, batch_size: tiling overrides.
        **overrides: metadata overrides (e.g. lesion="HE").

    Raises:
        RmibError: the file is not an rmib segmentation model.
    """
    from rmib import training

    model = training.load_model(model_path, unsafe=unsafe)
    metadata = training.read_run_metadata(model_path)
    metadata.update({k: v for k, v in overrides.items() if v is not None})
    if metadata.get("task") != "segment":
        raise RmibError(
            f"{model_path}: not a segmentation model (task {metadata.get('task')!r}); "
            "rmib predict and rmib evaluate take a run of `rmib segment`"
        )
    model_type = metadata.get("model", "encoder-decoder")
    if model_type not in SEGMENTER_TYPES:
        _import_model_types()
    if model_type not in SEGMENTER_TYPES:
        raise RmibError(
            f"{model_path}: unknown segmentation model type {model_type!r} "
            f"(known: {', '.join(sorted(SEGMENTER_TYPES))})"
        )
    return SEGMENTER_TYPES[model_type](
        model, metadata, tile=tile, overlap=overlap, batch_size=batch_size
    )


def make_segmenter(model, metadata, *, tile=None, overlap=None, batch_size=None):
    """The Segmenter of an already loaded model and its run metadata (as `load_segmenter`).

    Raises:
        RmibError: metadata of an unknown segmentation model type, or a bad tile.
    """
    model_type = dict(metadata or {}).get("model", "encoder-decoder")
    if model_type not in SEGMENTER_TYPES:
        _import_model_types()
    if model_type not in SEGMENTER_TYPES:
        raise RmibError(
            f"unknown segmentation model type {model_type!r} "
            f"(known: {', '.join(sorted(SEGMENTER_TYPES))})"
        )
    return SEGMENTER_TYPES[model_type](
        model, metadata, tile=tile, overlap=overlap, batch_size=batch_size
    )


def _import_model_types():
    """Import the modules that register further segmenter types."""
    import importlib

    for module in ("rmib.models.local_global", "rmib.models.dual2net"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


__all__ = [
    "Segmenter",
    "TiledSegmenter",
    "load_segmenter",
    "make_segmenter",
    "register_segmenter",
]
