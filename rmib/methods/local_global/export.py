"""The local-global U-Net's export (see `rmib.export`).

The fused network serves ``segment_patch(tiles, boxes, global_image)`` and a
``segment_image`` that runs GlobalNet once per photograph, then every tile
through LocalNet and the fusion head with its crop of GlobalNet's features,
as `LocalGlobalSegmenter` does. LocalNet alone (the paper's ablation) exports
as a tiled model, GlobalNet alone as a model of the resized photograph.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.errors import RmibError
from rmib.export.archive import spec
from rmib.export.checks import Case
from rmib.export.opencv_resize import opencv_area_resize
from rmib.export.segmenters import (
    PROBABILITY_MAP,
    ResizedExporter,
    SegmenterExporter,
    TiledExporter,
    add_segment_image,
    segment_image_docs,
    tiling_metadata,
    uniform_images,
)
from rmib.inference.tiling_tf import tiled_probability
from rmib.methods.local_global.segmenter import LocalGlobalSegmenter

DEFAULT_GLOBAL_SIZE = 640


def segmenter(model, run_metadata: dict, tile=None, overlap=None, batch_size=None):
    """The `LocalGlobalSegmenter` that `rmib predict` runs, with the export's tiling."""
    return LocalGlobalSegmenter(
        model, run_metadata, tile=tile, overlap=overlap, batch_size=batch_size
    )


def _multiple(run_metadata: dict, network: str) -> int:
    return 2 ** int((run_metadata.get("depths") or {}).get(network, 0))


def _fused_local(model, inputs: dict) -> np.ndarray:
    """The fused model's "local" output on `inputs`, run in a graph as `probability` runs one."""

    @tf.function
    def run(inputs):
        return tf.cast(model(inputs, training=False)["local"], tf.float32)

    return run({k: tf.convert_to_tensor(v) for k, v in inputs.items()}).numpy()


class FusedExporter(SegmenterExporter):
    """The fused network, its parts called as `LocalGlobalSegmenter` calls them."""

    kind = "fused"
    batch_signature = "segment_patch"
    tiles = True

    def metadata(self, run_metadata, preprocessing, tiling):
        meta = super().metadata(run_metadata, preprocessing, tiling)
        meta.update(tiling_metadata(tiling, _multiple(run_metadata, "local")))
        meta["global_size"] = int(run_metadata.get("global_size", DEFAULT_GLOBAL_SIZE))
        return meta

    def signature_docs(self, metadata):
        side = metadata.get("global_size", "G")
        inputs = {
            "tiles": spec(
                "float32",
                [None, "h", "w", 3],
                "full-resolution tiles of the preprocessed photograph in [0, 255]; "
                "h, w multiples of size_multiple",
            ),
            "boxes": spec(
                "float32",
                [None, 4],
                "each tile's box (y0, x0, y1, x1) normalised by the photograph's "
                "height and width, edge to edge: (top / H, left / W, (top + h) / H, "
                "(left + w) / W)",
            ),
            "global_image": spec(
                "float32",
                ["N", side, side, 3],
                "the whole preprocessed photograph resized to global_size x "
                "global_size (INTER_AREA, aspect not kept), in [0, 255]; N = 1 (every "
                "tile comes from that photograph) or N = the number of tiles",
            ),
        }
        how = (
            "GlobalNet run once on the photograph resized to global_size, every tile through "
            "LocalNet and the fusion head with its crop of GlobalNet's features, tiles blended "
            "with a Gaussian window"
        )
        return {
            "segment_patch": {"inputs": inputs, "outputs": PROBABILITY_MAP},
            "segment_image": segment_image_docs(how),
        }

    def add_endpoints(self, archive, model, metadata, patch_size=None):
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

        return ["segment_patch", *add_segment_image(archive, metadata, prob_fn)]

    def batch_cases(self, model, metadata, patch_size=None, seed=0):
        # The whole Keras model, one global image per tile (box b reads map b).
        rng = np.random.default_rng(seed)
        patch = patch_size or 2 * metadata["size_multiple"]
        tiles = uniform_images(rng, 2, patch, patch, 3)
        side = metadata["global_size"]
        boxes = np.array([[0.0, 0.0, 0.5, 0.4], [0.3, 0.55, 0.8, 0.95]], np.float32)
        global_image = uniform_images(rng, 1, side, side, 3)
        keras_inputs = {
            "global_image": np.repeat(global_image, 2, axis=0),
            "patch": tiles,
            "box": boxes,
        }
        out = _fused_local(model, keras_inputs)
        inputs = {"tiles": tiles, "boxes": boxes, "global_image": global_image}
        return [Case("segment_patch", inputs, {"probability": out})]


def _global_resize(run_metadata: dict) -> dict:
    """How GlobalNet alone sees a photograph: stretched to global_size, for the metadata."""
    side = int(run_metadata.get("global_size", DEFAULT_GLOBAL_SIZE))
    return {
        "input_size": [side, side],
        "size_multiple": _multiple(run_metadata, "global"),
        "resize": {
            "keep_aspect": False,
            "source": "float32",
            "down": "OpenCV INTER_AREA of the float32 photograph to input_size, aspect not kept",
            "back": "bilinear (OpenCV INTER_LINEAR) to the photograph's size, clipped to [0, 1]",
        },
    }


def export(run_metadata: dict) -> SegmenterExporter:
    """The exporter of a local-global run, by its "network" (`rmib.tasks.Method.export`).

    Raises:
        RmibError: an unknown network in the metadata.
    """
    network = run_metadata.get("network", "fused")
    fields = {"network": network}
    if network == "fused":
        return FusedExporter("local-global", segmenter, fields)
    if network == "local":
        return TiledExporter("local-global", segmenter, _multiple(run_metadata, "local"), fields)
    if network == "global":
        return ResizedExporter("local-global", segmenter, _global_resize(run_metadata), fields)
    raise RmibError(
        f"unknown local-global network {network!r} in the metadata; "
        "expected one of fused, local, global"
    )
