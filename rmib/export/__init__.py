"""`rmib export`: a trained model as a TensorFlow SavedModel, a `.keras` file or TFLite.

This package is the infrastructure and knows no model: `archive` (the
metadata, the SavedModel archive, the atomic files), `checks` (the export
against rmib's own prediction), `opencv_resize` (OpenCV's resizes in
TensorFlow ops) and `segmenters` (the serving signatures every segmenter
shares). Each method declares its signatures in
`rmib/methods/<method>/export.py`, an `rmib.export.archive.Exporter` that
its row of `rmib.tasks.METHODS` names; `rmib.export_model` (`rmib.tasks.export_model`)
dispatches on the run's metadata through that table.

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
  "mask": (H, W) uint8}``, computed as `rmib predict` computes it: tiling
  (`rmib.inference.tiling_tf`), Gaussian blending and field-of-view masking
  (tiled, fused: GlobalNet runs once per photograph), or the resize to the
  model's size and back (resized; OpenCV's ``INTER_AREA`` reproduced bit for
  bit in TensorFlow ops by `rmib.export.opencv_resize`), inside the graph;
  with the run's test-time augmentation (``tta`` in the metadata, `rmib
  segment --tta`) the mean over the flipped photographs, as `rmib predict`
  (the batch signatures stay single passes of the model).
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

from pathlib import Path

from rmib import training
from rmib.errors import RmibError
from rmib.export import checks
from rmib.export.archive import (
    CHECK_TOLERANCE,
    EXPORT_FORMATS,
    Exporter,
    ExportResult,
    export_metadata,
    write_export,
)
from rmib.training import devices as precisions


def export_run(
    model_path,
    out,
    format: str = "savedmodel",
    *,
    exporter_of,
    check: bool = False,
    unsafe: bool = False,
    tile: int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
) -> ExportResult:
    """Export a trained rmib model with the `Exporter` its method declares.

    `rmib.tasks.export_model` calls it with `exporter_of` reading the METHODS
    table; see there for the arguments.

    Args:
        exporter_of: run metadata -> the run's `Exporter` (raises `RmibError`
            for a run rmib cannot export).
    """
    if format not in EXPORT_FORMATS:
        raise RmibError(f"unknown export format {format!r}; expected {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    run_metadata, exporter = _read_run(model_path, format, exporter_of, tile, overlap)
    if format == "keras" and precision is not None:
        raise RmibError(
            "--precision applies to savedmodel and tflite exports; a .keras copy keeps the "
            f"precision the model was trained in ({run_metadata.get('precision', 'float32')})"
        )
    resolved = _export_precision(precision, run_metadata)
    model = exporter.load(model_path, unsafe)
    networks = exporter.networks(model)
    if format == "keras":
        resolved = precisions.model_precision(networks[0])
    else:
        for net in networks:
            precisions.with_precision(net, resolved)
    tiling = exporter.tiling(model, run_metadata, tile, overlap, batch_size)
    metadata = export_metadata(exporter, run_metadata, tiling, precision=resolved)
    names, differences = write_export(
        out, format, exporter, model, metadata, model_path, check=check, unsafe=unsafe
    )
    return ExportResult(
        out, format, names, differences, metadata, resolved, checks.tolerance(metadata)
    )


def _read_run(model_path, format: str, exporter_of, tile, overlap) -> tuple[dict, Exporter]:
    """(run metadata, exporter), refusing what cannot be exported before any model is loaded."""
    metadata = training.read_run_metadata(model_path)
    try:
        exporter = exporter_of(metadata)
    except RmibError as exc:
        raise RmibError(f"{model_path}: {exc}") from None
    exporter.refuse(model_path, format)
    if not exporter.tiles and (tile is not None or overlap is not None):
        raise RmibError(
            f"--tile and --overlap apply to tiled segmenters, not to {exporter.description}"
        )
    if overlap is not None and not 0 <= float(overlap) < 1:
        raise RmibError(f"--overlap must be in [0, 1), got {overlap}")
    return metadata, exporter


def _export_precision(precision: str | None, run_metadata: dict) -> str:
    """The policy an export computes in (mixed_float16 allowed without a GPU: for a GPU server)."""
    resolved, _ = precisions.resolve_predict_precision(
        precision or precisions.PREDICT_DEFAULT, run_metadata.get("precision"), allow_slow=True
    )
    return resolved


__all__ = [
    "CHECK_TOLERANCE",
    "EXPORT_FORMATS",
    "ExportResult",
    "export_run",
]
