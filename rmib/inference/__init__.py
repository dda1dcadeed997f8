"""Whole-photograph inference: the tiling (`tiling`), its options (`options`), test-time flips
(`tta`) and the Segmenter base class (`segmenter`)."""

from rmib.inference.options import TilingOptions
from rmib.inference.tiling import *  # noqa: F403
from rmib.inference.tiling import __all__ as _tiling_all

__all__ = ["TilingOptions", *_tiling_all]
