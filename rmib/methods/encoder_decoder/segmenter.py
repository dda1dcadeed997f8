"""The encoder-decoder's whole-photograph prediction: overlapping tiles of any size."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.data import fundus
from rmib.errors import RmibError
from rmib.inference.options import TilingOptions
from rmib.inference.segmenter import (
    AUTO_TILE,
    DEFAULT_HALO,
    DEFAULT_MAX_TILE_PIXELS,
    Segmenter,
    compiled_predict,
)
from rmib.inference.tiling import mask_box, plan_tiles, predict_tiled


def tiled_segmenter(model, metadata: dict, cfg) -> TiledSegmenter:
    """The encoder-decoder's `TiledSegmenter` with the tiling and ``tta`` of a `SegmentConfig`.

    ``predict_tile = "auto"`` plans large tiles overlapping by 2 * predict_halo
    pixels (one per call); a number gives fixed tiles overlapping by the fraction
    predict_overlap, predict_batch per call.
    """
    if cfg.predict_tile == AUTO_TILE:
        tiling = TilingOptions(AUTO_TILE, halo=cfg.predict_halo, max_tile=cfg.predict_max_tile)
    else:
        tiling = TilingOptions(cfg.predict_tile, cfg.predict_overlap, cfg.predict_batch)
    return TiledSegmenter(model, metadata, tiling=tiling, tta=cfg.tta)


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
        tiling: tile, overlap, batch_size, halo and max_tile as one
            `rmib.inference.TilingOptions` (the arguments given override it).
        scale: working resolution in (0, 1] (default the run's ``scale``, else 1):
            the preprocessed photograph and its field of view are resized by it
            (`rmib.data.fundus.rescale`), tiled as above, and the map resized back
            (bilinear) and zeroed outside the full-resolution field of view; at 1
            the photograph is tiled as it is.
        tta: test-time augmentation (`rmib.inference.tta`; default the run's
            ``tta``, else "none"): the whole photograph is flipped (and turned)
            before the steps above, each map moved back and the maps averaged.
    """

    model_type = "encoder-decoder"

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
        tiling=None,
        tta=None,
    ):
        tiling = TilingOptions.of(
            tiling,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            halo=halo,
            max_tile=max_tile,
        )
        super().__init__(model, metadata, tiling=tiling, tta=tta)
        tile, overlap, batch_size = tiling.tile, tiling.overlap, tiling.batch_size
        halo, max_tile = tiling.halo, tiling.max_tile
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
        """(tile, overlap, region) that `predict_view` uses for an image of this size.

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

    def predict_view(self, image, fov=None):
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
