"""Dual2Net on whole photographs: the photograph resized to the model's input, the map resized back."""

from __future__ import annotations

import cv2
import numpy as np
import tensorflow as tf

from rmib.data import fundus
from rmib.data.pipeline import preprocess_array
from rmib.errors import RmibError
from rmib.inference.segmenter import Segmenter
from rmib.inference.tta import turns


def resize_to_model(image: np.ndarray, image_size, interpolation=cv2.INTER_AREA):
    """Resize a photograph (or, with INTER_NEAREST, a mask) to the model's (height, width),
    keeping the aspect ratio with centred zero padding; returns (array, transform)."""
    return fundus.resize_pad(image, tuple(int(s) for s in image_size), interpolation=interpolation)


def check_turns(tta: str, image_size) -> None:
    """Refuse test-time quarter turns with a non-square input size (naming both).

    Raises:
        RmibError: `tta` turns the photograph and `image_size` is not square.
    """
    height, width = (int(s) for s in image_size)
    if turns(tta) and height != width:
        raise RmibError(
            f"--tta {tta} turns the photograph a quarter, but this Dual2Net model's input is "
            f"{height}x{width} (image_size): a turned photograph would be fitted into it at "
            "another scale; use --tta flips (or train with a square --image-size)"
        )


class Dual2NetSegmenter(Segmenter):
    """Dual2Net on a whole photograph: resized to the model's `image_size` (from the
    run metadata), the mean of both branches, resized back to full resolution
    (bilinear) and zeroed outside the field of view.

    `tile`, `overlap` and `batch_size` are accepted for the common interface
    and ignored: the paper predicts the resized photograph in one pass. `tta`
    (`rmib.inference.tta`; default the run's ``tta``): "flips" for any input
    size; "flips-rot90" only with a square one (a photograph turned a quarter
    would be fitted into a non-square input at another scale).

    Raises:
        RmibError: metadata without image_size, or "flips-rot90" with a non-square one.
    """

    model_type = "dual2net"

    def __init__(self, model, metadata, tile=None, overlap=None, batch_size=None, *, tta=None):
        super().__init__(model, metadata, tile, overlap, batch_size, tta=tta)
        size = self.metadata.get("image_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise RmibError(
                f"the model's metadata has no image_size [height, width] (got {size!r}); "
                "is it a Dual2Net run?"
            )
        self.image_size = (int(size[0]), int(size[1]))
        check_turns(self.tta, self.image_size)

        # The model always sees image_size: static shapes make a smaller graph.
        spec = tf.TensorSpec((None, *self.image_size, 3), tf.float32)

        @tf.function(input_signature=[spec])
        def predict(batch):
            return tf.cast(model(batch, training=False), tf.float32)

        self._predict = predict

    def predict_view(self, image, fov=None):
        image = np.asarray(image)
        resized, transform = resize_to_model(image, self.image_size)
        prob = self._predict(tf.convert_to_tensor(resized[None], tf.float32)).numpy()[0, ..., 0]
        prob = fundus.unresize_pad(prob, transform, image.shape[:2], interpolation=cv2.INTER_LINEAR)
        prob = np.clip(prob, 0.0, 1.0).astype(np.float32)
        if fov is not None:
            prob *= np.asarray(fov) > 0
        return prob

    def predict(self, image):
        image = np.asarray(image)
        prepared, _, fov = preprocess_array(image, self.preprocessing)
        prob = self.predict_prepared(prepared, fov)
        frame = fundus.idrid_centre_crop(image) if self.preprocessing.centre_crop else image
        if self.preprocessing.fov_crop:
            y0, x0, y1, x1 = fundus.fov_box(frame)
            full = np.zeros(frame.shape[:2], np.float32)
            full[y0:y1, x0:x1] = prob
            prob = full
        if self.preprocessing.centre_crop:
            full = np.zeros(image.shape[:2], np.float32)
            y0, x0, _, _ = fundus.idrid_centre_box(image.shape[:2])
            full[y0 : y0 + prob.shape[0], x0 : x0 + prob.shape[1]] = prob
            prob = full
        return prob
