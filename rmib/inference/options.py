"""`TilingOptions`: how a Segmenter tiles a photograph, one value for the CLI, the loaders and
the Segmenters."""

from __future__ import annotations

import dataclasses

from rmib.errors import RmibError


@dataclasses.dataclass(frozen=True)
class TilingOptions:
    """How a Segmenter tiles a photograph; None leaves a choice to the run, then the default.

    The options of `rmib predict` / `rmib evaluate` (--tile, --overlap,
    --tile-batch, --halo, --max-tile), of `rmib.tasks.load_segmenter` and of
    every Segmenter's constructor.

    Attributes:
        tile: "auto" (planned large tiles over the field of view) or a tile side in pixels.
        overlap: overlap fraction of fixed tiles, in [0, 1).
        batch_size: tiles per model call.
        halo: with tile "auto", pixels of context a tile keeps around what it predicts.
        max_tile: with tile "auto", the largest tile side.

    Raises:
        RmibError: an overlap outside [0, 1).
    """

    tile: int | str | None = None
    overlap: float | None = None
    batch_size: int | None = None
    halo: int | None = None
    max_tile: int | None = None

    def __post_init__(self):
        if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
            raise RmibError(f"--overlap must be in [0, 1), got {self.overlap}")

    @classmethod
    def of(cls, tiling: TilingOptions | None = None, **options) -> TilingOptions:
        """`tiling` (default: no choice made) with every option given as not None put in.

        Keeps the keyword arguments of the functions that take a `tiling` working:
        ``TilingOptions.of(tiling, tile=tile, overlap=overlap)``.
        """
        given = {name: value for name, value in options.items() if value is not None}
        return dataclasses.replace(tiling or cls(), **given)

    @property
    def auto_only(self) -> bool:
        """Whether an option of "auto" tiles (halo, max_tile) is set."""
        return self.halo is not None or self.max_tile is not None


__all__ = ["TilingOptions"]
