"""Whole-photograph inference: the tiling (`tiling`) and the Segmenter base class (`segmenter`)."""

from rmib.inference.tiling import *  # noqa: F403
from rmib.inference.tiling import __all__ as _tiling_all

__all__ = list(_tiling_all)
