"""Dual2Net's export: ``segment_resized(images)`` and ``segment_image`` (see `rmib.export`)."""

from __future__ import annotations

from rmib.errors import RmibError
from rmib.export.segmenters import ResizedExporter
from rmib.methods.dual2net.segmenter import Dual2NetSegmenter


def resize_rule(run_metadata: dict) -> dict:
    """How Dual2Net sees a photograph: its input size and the resize, for the export metadata.

    Raises:
        RmibError: metadata without the model's image size.
    """
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


def segmenter(model, run_metadata: dict, tile=None, overlap=None, batch_size=None):
    """The `Dual2NetSegmenter` that `rmib predict` runs (it does not tile)."""
    return Dual2NetSegmenter(model, run_metadata, tile=tile, overlap=overlap, batch_size=batch_size)


def export(run_metadata: dict) -> ResizedExporter:
    """The exporter of a Dual2Net run (`rmib.tasks.Method.export`)."""
    return ResizedExporter("dual2net", segmenter, resize_rule(run_metadata))
