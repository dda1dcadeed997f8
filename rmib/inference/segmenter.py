"""Whole-photograph prediction for every segmentation model rmib trains.

A `Segmenter` wraps a trained Keras model with the metadata of its run
(lesion, preprocessing, model type) and turns a photograph of any size into a
full-resolution probability map. Each model type registers how it predicts:
the encoder-decoder by overlapping tiles (`rmib.inference.predict_tiled`),
the local-global U-Net by tiles that also see the global features, Dual2Net
on the resized photograph. Every one averages over test-time flips the same
way (`rmib.inference.tta`): subclasses predict one view (`predict_view`), the
base class averages the views of the run's (or the caller's) ``tta``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.data import fundus
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.inference.options import TilingOptions
from rmib.inference.tta import check_tta, predict_with_tta

AUTO_TILE = "auto"
DEFAULT_HALO = 64
DEFAULT_MAX_TILE_PIXELS = 1024 * 1024
EXPORT_TILE = 512  # segment_image of a SavedModel tiles with fixed tiles (see rmib.export)


class Segmenter:
    """Base class: preprocessing, restoring the original geometry, FOV masking.

    Args:
        model: the trained Keras model.
        metadata: the run's rmib.json dict (lesion, preprocessing, sizes ...).
        tile, overlap, batch_size: tiling parameters (subclasses that tile).
        tiling: the same as a `TilingOptions` (the arguments above override it).
        tta: test-time augmentation, one of `rmib.choices.TTA` (default the run's
            ``tta``, else "none"); "flips" costs 4 forward passes, "flips-rot90" 8.

    Raises:
        RmibError: an unknown `tta` (a subclass also refuses one its model cannot take).
    """

    model_type = "base"

    def __init__(
        self, model, metadata, tile=None, overlap=None, batch_size=None, *, tiling=None, tta=None
    ):
        tiling = TilingOptions.of(tiling, tile=tile, overlap=overlap, batch_size=batch_size)
        tile, overlap, batch_size = tiling.tile, tiling.overlap, tiling.batch_size
        self.model = model
        self.metadata = dict(metadata or {})
        self.lesion = self.metadata.get("lesion")
        self.preprocessing = Preprocessing.from_dict(self.metadata.get("preprocessing"))
        self.tile = tile
        self.overlap = overlap
        self.batch_size = batch_size
        self.tta = check_tta(self.metadata.get("tta", "none") if tta is None else tta)

    def predict_view(self, image: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
        """Probability map (H, W) float32 of one view of a preprocessed image (H, W, 3)."""
        raise NotImplementedError

    def predict_prepared(self, image: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
        """Probability map (H, W) float32 for an already preprocessed image (H, W, 3),
        averaged over the views of `tta` (`rmib.inference.tta.predict_with_tta`)."""
        return predict_with_tta(self.predict_view, image, fov, self.tta)

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


def compiled_predict(model, channels=3):
    """The model in a `tf.function` over float32 batches: its first output, cast to float32."""

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, channels), tf.float32)])
    def predict(batch):
        out = model(batch, training=False)
        if isinstance(out, dict):
            out = out[sorted(out)[0]]
        if isinstance(out, (list, tuple)):
            out = out[0]
        return tf.cast(out, tf.float32)

    return predict
