"""The encoder-decoder's export: ``segment_patch`` and ``segment_image`` (see `rmib.export`)."""

from __future__ import annotations

from rmib.errors import RmibError
from rmib.export.segmenters import TiledExporter
from rmib.inference.segmenter import EXPORT_TILE
from rmib.methods.encoder_decoder.segmenter import TiledSegmenter


def segmenter(model, run_metadata: dict, tile=None, overlap=None, batch_size=None):
    """The `TiledSegmenter` of ``segment_image``: `rmib predict`'s, with the overrides.

    A run whose `rmib predict` plans large tiles per photograph
    (``predict_tile = "auto"``) exports fixed `EXPORT_TILE`-px tiles unless
    --tile says otherwise: the graph of ``segment_image`` tiles every
    photograph the same way.
    """
    if tile is None and run_metadata.get("predict_tile") in (None, "auto"):
        tile = EXPORT_TILE
    return TiledSegmenter(model, run_metadata, tile=tile, overlap=overlap, batch_size=batch_size)


def export(run_metadata: dict) -> TiledExporter:
    """The exporter of an encoder-decoder run (`rmib.tasks.Method.export`).

    Raises:
        RmibError: a run that predicts at a working scale other than 1.
    """
    scale = run_metadata.get("scale", 1.0)
    if scale != 1.0:
        raise RmibError(
            f"rmib export: this run predicts at scale {scale} (rmib segment --scale), and "
            "the exported segment_image tiles at full resolution without resizing, so it "
            "would serve different maps; use rmib predict, or export a run at scale 1"
        )
    return TiledExporter("encoder-decoder", segmenter, run_metadata.get("size_multiple", 32))
