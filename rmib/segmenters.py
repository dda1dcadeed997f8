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
from rmib.inference import mask_box, plan_tiles, predict_tiled

AUTO_TILE = "auto"
DEFAULT_HALO = 64
DEFAULT_MAX_TILE_PIXELS = 1024 * 1024
EXPORT_TILE = 512  # segment_image of a SavedModel tiles with fixed tiles (see rmib.export)

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


@register_segmenter("encoder-decoder")
class TiledSegmenter(Segmenter):
    """A fully convolutional segmenter applied to overlapping tiles.

    The tile may be much larger than the training patch: the network is fully
    convolutional, so a large tile costs the same per pixel as a 160-px one
    while the overlap needed for seamless blending becomes a small fraction.

    Two tilings:

    - ``tile="auto"`` (the default): the tiles cover only the field of view's
      bounding box, as few and as even as `rmib.inference.plan_tiles` finds
      with at most ``max_tile ** 2`` pixels each (1024 x 1024: about 1 GB of
      float32 activations through VGG16), and neighbours overlap by ``2 *
      halo`` pixels blended with the ``"ramp"`` window, so the pixels a tile
      contributes most to lie at least `halo` pixels from its border (a
      VGG16 decoder's output changes by about 1% at 48-64 px from a zero-padded
      border, and by 1e-5 beyond 128 px);
    - ``tile=N``: square N-px tiles overlapping by the fraction `overlap`,
      blended with nnU-Net's Gaussian window, over the whole photograph (the
      tiling of an exported SavedModel's ``segment_image``).

    Args:
        model, metadata: the trained model and its run metadata.
        tile: "auto" or a tile side (a multiple of the model's size multiple);
            default the run's ``predict_tile``, else "auto".
        overlap: overlap fraction of fixed tiles (default 0.125).
        batch_size: tiles per call (default 1 for "auto", 2 for fixed tiles).
        halo: pixels of context a tile keeps beyond what it contributes most
            to ("auto" only; default the run's ``predict_halo``, else 64).
        max_tile: largest tile side ("auto" only): tiles hold at most
            ``max_tile ** 2`` pixels (default the run's ``predict_max_tile``, else 1024).
        max_tile_pixels: largest tile area, instead of `max_tile`.
        scale: working resolution in (0, 1] (default the run's ``scale``, else 1):
            the preprocessed photograph and its field of view are resized by it
            (`rmib.data.fundus.rescale`), tiled as above, and the map resized back
            (bilinear) and zeroed outside the full-resolution field of view; at 1
            the photograph is tiled as it is.
    """

    def __init__(
        self,
        model,
        metadata,
        tile=None,
        overlap=None,
        batch_size=None,
        *,
        halo=None,
        max_tile=None,
        max_tile_pixels=None,
        scale=None,
    ):
        super().__init__(model, metadata, tile, overlap, batch_size)
        self.scale = fundus.check_scale(self.metadata.get("scale", 1.0) if scale is None else scale)
        self.multiple = int(self.metadata.get("size_multiple", 32))
        tile = tile or self.metadata.get("predict_tile") or AUTO_TILE
        if tile == AUTO_TILE:
            if overlap is not None:
                raise RmibError(
                    "--overlap sets the overlap of fixed tiles (--tile N); with --tile auto "
                    "tiles overlap by twice --halo pixels"
                )
            self.tile = AUTO_TILE
            self.overlap = None
            halo = self.metadata.get("predict_halo", DEFAULT_HALO) if halo is None else halo
            if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
                raise RmibError(f"--halo must be a non-negative number of pixels, got {halo!r}")
            self.halo = int(halo)
            if max_tile_pixels is None:
                side = self.metadata.get("predict_max_tile") if max_tile is None else max_tile
                if side is not None and (
                    isinstance(side, bool) or not isinstance(side, int) or side < self.multiple
                ):
                    raise RmibError(
                        f"--max-tile must be a number of pixels >= {self.multiple}, got {side!r}"
                    )
                max_tile_pixels = side * side if side else DEFAULT_MAX_TILE_PIXELS
            self.max_tile_pixels = int(max_tile_pixels)
            smallest = -(-(2 * self.halo + 1) // self.multiple) * self.multiple
            if smallest * smallest > self.max_tile_pixels:
                raise RmibError(
                    f"--halo {self.halo} needs tiles of at least {smallest}x{smallest} pixels, "
                    f"more than the {self.max_tile_pixels} allowed (--max-tile)"
                )
            self.batch_size = int(batch_size or 1)
        else:
            try:
                self.tile = int(tile)
            except (TypeError, ValueError):
                raise RmibError(
                    f"--tile must be 'auto' or a number of pixels, got {tile!r}"
                ) from None
            if self.tile < 1 or self.tile % self.multiple:
                raise RmibError(f"--tile must be a multiple of {self.multiple}, got {self.tile}")
            if halo is not None or max_tile is not None:
                raise RmibError(
                    "--halo and --max-tile apply to --tile auto; fixed tiles take --overlap"
                )
            self.halo = None
            self.max_tile_pixels = None
            self.overlap = 0.125 if overlap is None else float(overlap)
            self.batch_size = int(batch_size or 2)
        self._predict = compiled_predict(model)
        self.last_plan = None  # (tile, region) of the last "auto" prediction

    def tiling(self, height: int, width: int, fov=None):
        """(tile, overlap, region) that `predict_prepared` uses for an image of this size.

        For "auto": tile = (th, tw), overlap = 2 * halo pixels, region = the
        field of view's bounding box (None without a mask, or when it is
        empty); for fixed tiles: (tile, overlap fraction, None).
        """
        if self.tile != AUTO_TILE:
            return self.tile, self.overlap, None
        region = mask_box(fov) if fov is not None else None
        if region is None:
            region_h, region_w = height, width
        else:
            region_h, region_w = region[2] - region[0], region[3] - region[1]
        overlap = 2 * self.halo
        tile = plan_tiles(region_h, region_w, self.max_tile_pixels, overlap, self.multiple)
        return tile, overlap, region

    def predict_prepared(self, image, fov=None):
        image = np.asarray(image)
        fov = None if fov is None else np.asarray(fov)
        if self.scale == 1.0:
            return self._predict_at_working_scale(image, fov)
        small_fov = None if fov is None else fundus.rescale(fov, self.scale, "mask")
        prob = self._predict_at_working_scale(fundus.rescale(image, self.scale), small_fov)
        prob = fundus.unscale_probability(prob, image.shape)
        return prob if fov is None else np.multiply(prob, fov != 0, out=prob)

    def _predict_at_working_scale(self, image, fov):
        tile, overlap, region = self.tiling(image.shape[0], image.shape[1], fov)
        if self.tile == AUTO_TILE:
            self.last_plan = (tile, region)
        # The image goes in as it is (uint8): predict_tiled casts each batch of
        # tiles to float32, so no float copy of the whole photograph is made.
        out = predict_tiled(
            lambda tiles: self._predict(tf.convert_to_tensor(tiles, tf.float32)),
            image,
            tile=tile,
            overlap=overlap,
            batch_size=self.batch_size,
            mask=fov,
            window="ramp" if self.tile == AUTO_TILE else "gaussian",
            region=region,
        )
        return out[..., 0]


def load_segmenter(
    model_path,
    *,
    unsafe=False,
    tile=None,
    overlap=None,
    batch_size=None,
    halo=None,
    max_tile=None,
    precision="float32",
    **overrides,
):
    """Load a run directory or `.keras` file as a Segmenter.

    Args:
        model_path: run directory or `.keras` file.
        unsafe: allow models that need Keras unsafe deserialization (Lambda layers).
        tile, overlap, batch_size, halo, max_tile: tiling overrides ("auto" or a side;
            see `TiledSegmenter`).
        precision: the policy to predict in: "float32" (the default, as
            `rmib predict`), "mixed_bfloat16" or "mixed_float16" (see
            `rmib.precision.resolve_predict_precision` for "auto"); None: the
            precision the model was trained in.
        **overrides: metadata overrides (e.g. lesion="HE").

    Raises:
        RmibError: the file is not an rmib segmentation model.
    """
    from rmib import training

    model = training.load_model(model_path, unsafe=unsafe)
    if precision is not None:
        from rmib.precision import with_precision

        with_precision(model, precision)
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
    return _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile)


def _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile):
    cls = SEGMENTER_TYPES[model_type]
    if halo is None and max_tile is None:
        return cls(model, metadata, tile=tile, overlap=overlap, batch_size=batch_size)
    if cls is not TiledSegmenter:
        raise RmibError(
            f"--halo and --max-tile apply to encoder-decoder models, not to {model_type}"
        )
    return cls(
        model,
        metadata,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        halo=halo,
        max_tile=max_tile,
    )


def make_segmenter(
    model, metadata, *, tile=None, overlap=None, batch_size=None, halo=None, max_tile=None
):
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
    return _construct(model_type, model, metadata, tile, overlap, batch_size, halo, max_tile)


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
