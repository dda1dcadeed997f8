"""The fused local-global U-Net on whole photographs: tiles that also see the global features."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import tensorflow as tf

from rmib.data import fundus
from rmib.data.pipeline import preprocess_array
from rmib.errors import RmibError
from rmib.inference.segmenter import Segmenter
from rmib.inference.tiling import predict_tiled
from rmib.methods.local_global.model import (
    NETWORKS,
    crop_global_features,
    pad_global_features,
    resize_global,
)


def _fits_centre_crop(shape) -> bool:
    crop_h, crop_w = fundus.IDRID_CROP_SHAPE
    return shape[0] >= crop_h and shape[1] >= crop_w


class LocalGlobalSegmenter(Segmenter):
    """Whole-photograph prediction with a local-global U-Net run (Yan et al. 2019).

    The run's metadata "network" says what the model is: "fused" (the full
    method), or "global" / "local" (GlobalNet or LocalNet alone, the paper's
    ablation). Fused: GlobalNet's trunk runs ONCE on the photograph resized to
    `global_size`; then every tile goes through LocalNet and the fusion head
    with its crop of that feature map (`predict_tiled(..., with_boxes=True)`),
    so the cost over LocalNet alone is the fusion head plus one GlobalNet pass.
    GlobalNet alone: predicted on the resized photograph, resized back
    (bilinear). LocalNet alone: tiles.

    The IDRiD centre crop of the metadata is applied only to photographs at
    least 2816 x 3328 (H x W); smaller ones are used whole.

    Args:
        model: the trained model of the run.
        metadata: its rmib.json ("network", "global_size", "patch_size", "depths" ...).
        tile: tile side (default, or "auto": the training patch size; a multiple of
            2**local_depth).
        overlap: tile overlap fraction (default 0.25).
        batch_size: tiles per batch (default the run's predict_batch, else 4).
        tta: test-time augmentation (`rmib.inference.tta`; default the run's ``tta``):
            GlobalNet sees each flipped (turned) photograph too.

    Raises:
        RmibError: a tile that LocalNet cannot take, or unknown metadata.
    """

    model_type = "local-global"

    def __init__(self, model, metadata, tile=None, overlap=None, batch_size=None, *, tta=None):
        super().__init__(model, metadata, tile, overlap, batch_size, tta=tta)
        self.network = self.metadata.get("network", "fused")
        if self.network not in NETWORKS:
            raise RmibError(
                f"unknown local-global network {self.network!r} in the model's metadata; "
                f"expected one of {', '.join(NETWORKS)}"
            )
        self.global_size = int(self.metadata.get("global_size", 640))
        depths = self.metadata.get("depths") or {}
        multiple = 2 ** int(depths.get("local", 0))
        if tile == "auto":  # the planned large tiles are the encoder-decoder's; here the patch
            tile = None
        self.tile = int(tile or self.metadata.get("patch_size") or 256)
        if self.network != "global" and self.tile % multiple:
            raise RmibError(
                f"--tile must be a multiple of {multiple} for this model, got {self.tile}"
            )
        self.overlap = 0.25 if overlap is None else float(overlap)
        self.batch_size = int(batch_size or self.metadata.get("predict_batch") or 4)
        self._build_functions()

    def _build_functions(self):
        model = self.model
        image_spec = tf.TensorSpec((None, None, None, 3), tf.float32)
        if self.network in ("global", "local"):

            @tf.function(input_signature=[image_spec])
            def single(batch):
                return tf.cast(model(batch, training=False), tf.float32)

            self._single = single
            return
        global_trunk = model.get_layer("global_trunk")
        local_trunk = model.get_layer("local_trunk")
        crop = model.get_layer("fusion_crop")
        concat = model.get_layer("fusion_concat")
        head = model.get_layer("fusion_head")
        channels = global_trunk.output.shape[-1]

        @tf.function(input_signature=[image_spec])
        def global_features(image):
            return tf.cast(global_trunk(image, training=False), tf.float32)

        @tf.function(
            input_signature=[
                image_spec,
                tf.TensorSpec((None, 4), tf.float32),
                tf.TensorSpec((1, None, None, channels), tf.float32),
            ]
        )
        def local_fused(tiles, boxes, padded_features):
            local = local_trunk(tiles, training=False)
            size = (tf.shape(local)[1], tf.shape(local)[2])
            cropped = crop_global_features(padded_features, boxes, size, padded=True)
            cropped = tf.cast(cropped, crop.compute_dtype)
            return tf.cast(head(concat([local, cropped]), training=False), tf.float32)

        self._global_features = global_features
        self._local_fused = local_fused

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probability map (H, W) float32 for a raw uint8 RGB photograph of any size."""
        image = np.asarray(image)
        prep = self.preprocessing
        crop = prep.centre_crop and _fits_centre_crop(image.shape)
        if prep.centre_crop and not crop:
            prep = dataclasses.replace(prep, centre_crop=False)
        prepared, _, fov = preprocess_array(image, prep)
        prob = self.predict_prepared(prepared, fov)
        if crop:
            full = np.zeros(image.shape[:2], np.float32)
            y0, x0, _, _ = fundus.idrid_centre_box(image.shape[:2])
            full[y0 : y0 + prob.shape[0], x0 : x0 + prob.shape[1]] = prob
            prob = full
        return prob

    def predict_view(self, image, fov=None):
        image = np.asarray(image, np.float32)
        mask = None if fov is None else np.asarray(fov)
        height, width = image.shape[:2]
        if self.network == "global":
            small = resize_global(image, self.global_size)[None]
            prob = self._single(tf.convert_to_tensor(small, tf.float32)).numpy()[0, ..., 0]
            prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
            prob = np.clip(prob, 0.0, 1.0)
            if mask is not None:
                prob[mask == 0] = 0.0
            return prob.astype(np.float32)
        if self.network == "local":
            out = predict_tiled(
                lambda tiles: self._single(tf.convert_to_tensor(tiles, tf.float32)),
                image,
                tile=self.tile,
                overlap=self.overlap,
                batch_size=self.batch_size,
                mask=mask,
            )
            return out[..., 0]
        small = resize_global(image, self.global_size)[None]
        features = self._global_features(tf.convert_to_tensor(small, tf.float32))
        features = pad_global_features(features)  # once per photograph, not per batch
        out = predict_tiled(
            lambda tiles, boxes: self._local_fused(
                tf.convert_to_tensor(tiles, tf.float32),
                tf.convert_to_tensor(boxes, tf.float32),
                features,
            ),
            image,
            tile=self.tile,
            overlap=self.overlap,
            batch_size=self.batch_size,
            with_boxes=True,
            mask=mask,
        )
        return out[..., 0]
