"""Moved to `rmib.training.devices` (precision of training and of prediction); kept for imports."""

from rmib.training.devices import *  # noqa: F403
