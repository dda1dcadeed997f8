"""Dual2Net with its dual-sampling modulated Dice loss."""
