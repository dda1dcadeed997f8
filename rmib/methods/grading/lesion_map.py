"""The weighted lesion map of the two-stage DR grader (Yang et al., MICCAI 2017, Sec. III-C).

The local network labels every patch of the grid (label map L) with its largest
softmax probability (probability map P). LP = (L + 1) * P weights each patch
by lesion severity and confidence (the + 1 keeps some of the normal patches'
content). Each entry is expanded to an h x h block, the blocks are placed at
their grid positions and averaged where they overlap, giving the weighting
matrix M of the image's size; the global network grades I* = (M / 4) * I,
divided by 4 (the largest weight, label 3 at probability 1) so that I* stays
in the range of I.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rmib.data.fundus import resize_pad
from rmib.methods.grading.grid import DEFAULT_OVERLAP, DEFAULT_PATCH, grid_positions
from rmib.methods.grading.patches import iter_patch_batches

MAX_WEIGHT = 4.0  # (L + 1) * P at L = 3 (exudate), P = 1.


def _grid_map(values, n: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape == (n * n,):
        array = array.reshape(n, n)
    if array.shape != (n, n):
        raise ValueError(
            f"{name} must have shape ({n}, {n}) or ({n * n},) for a {n}x{n} grid, got {array.shape}"
        )
    return array


def coverage_counts(size: int, patch: int, overlap: int) -> np.ndarray:
    """(size, n) 0/1 matrix: pixel row y lies in the patch starting at positions[i]."""
    positions = np.asarray(grid_positions(size, patch, overlap))
    pixels = np.arange(size)[:, None]
    return ((pixels >= positions) & (pixels < positions + patch)).astype(np.float64)


def weighted_lesion_map(
    labels, probs, size: int, patch: int = DEFAULT_PATCH, overlap: int = DEFAULT_OVERLAP
) -> np.ndarray:
    """Weighting matrix M of one image from the local network's patch predictions.

    Args:
        labels: predicted patch labels (0 normal, 1 MA, 2 haemorrhage,
            3 exudate), shape (n, n) or flat (n * n,) in row-major grid order
            (the order of `grid_boxes`), n = ``len(grid_positions(size, patch, overlap))``.
        probs: the largest softmax probability of each patch, same shape, in [0, 1].
        size: side of the square image, in pixels.
        patch: side of a patch, in pixels.
        overlap: pixels shared by neighbouring patches.

    Returns:
        M, float32 (size, size): at each pixel the mean of (L + 1) * P over the
        patches covering it, in [0, 4] for 4 classes.

    Raises:
        ValueError: bad grid arguments (see `grid_positions`), maps of the wrong
            shape, negative or non-integer labels, or probabilities outside [0, 1].
    """
    coverage = coverage_counts(size, patch, overlap)
    n = coverage.shape[1]
    labels = _grid_map(labels, n, "labels")
    probs = _grid_map(probs, n, "probs").astype(np.float64)
    labels_f = labels.astype(np.float64)
    if np.any(labels_f < 0) or np.any(labels_f != np.round(labels_f)):
        raise ValueError(f"labels must be non-negative integers, got values {np.unique(labels)}")
    if not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError(
            f"probs must lie in [0, 1], got min {np.nanmin(probs)}, max {np.nanmax(probs)}"
        )
    weights = (labels_f + 1.0) * probs
    # A block is constant, so the sum of the blocks covering pixel (y, x) is
    # sum_ij A[y, i] LP[i, j] A[x, j] = (A LP A^T)[y, x], and the number of them
    # is (sum_i A[y, i]) (sum_j A[x, j]); no pixel is uncovered (last patch flush).
    total = coverage @ weights @ coverage.T
    count = coverage.sum(axis=1)
    return (total / np.outer(count, count)).astype(np.float32)


def apply_lesion_map(image, weights) -> np.ndarray:
    """The weighted lesion map I* = (M / 4) * I fed to the global network.

    Args:
        image: (H, W) or (H, W, C) array, or a batch (B, H, W, C) with weights
            (B, H, W); any numeric dtype (e.g. uint8 after Graham preprocessing).
        weights: the weighting matrix M from `weighted_lesion_map`, (H, W) (or
            (B, H, W) for a batch), values in [0, 4].

    Returns:
        float32 array of the image's shape, in the image's range.

    Raises:
        ValueError: weights whose shape does not match the image's spatial shape.
    """
    image = np.asarray(image)
    weights = np.asarray(weights, dtype=np.float32)
    if image.shape == weights.shape:
        scale = weights
    elif image.shape[:-1] == weights.shape:
        scale = weights[..., None]
    else:
        raise ValueError(
            f"weighting matrix of shape {weights.shape} does not match image of shape "
            f"{image.shape}; expected the image's spatial shape"
        )
    return (scale / np.float32(MAX_WEIGHT)) * image.astype(np.float32)


@dataclasses.dataclass
class LesionMap:
    """The local net's reading of one image.

    Attributes:
        weights: the weighting matrix M (size, size) float32 in [0, 4].
        labels: the label map L (n, n) int64 (argmax).
        probs: the probability map P (n, n) float32 (largest probability).
        class_probs: every patch's softmax (n * n, K), grid order (for
            lesion-vs-normal ROC curves).
    """

    weights: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    class_probs: np.ndarray


def predict_lesion_map(
    predict_fn,
    image,
    patch: int = DEFAULT_PATCH,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 256,
) -> LesionMap:
    """Run the local network over the grid of one image and build its weighting matrix.

    Args:
        predict_fn: the local network (a Keras model, run with
            ``predict_on_batch``) or any callable mapping float32 patches
            (B, patch, patch, C) to class probabilities (B, K).
        image: square (size, size, C) or (size, size) array, preprocessed as
            the local network was trained (e.g. Graham at 800 px).
        patch: side of a patch, in pixels.
        overlap: pixels shared by neighbouring patches.
        batch_size: patches per call of ``predict_fn``.

    Returns:
        A `LesionMap`: M float32 (size, size) from `weighted_lesion_map`, the
        label map L (n, n) int64 (argmax), the probability map P (n, n)
        float32 (max probability) and every patch's probabilities.

    Raises:
        ValueError: a non-square image, bad grid arguments, or a prediction
            that is not (B, K).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square (size, size[, C]), got shape {image.shape}")
    size = image.shape[0]
    run = getattr(predict_fn, "predict_on_batch", predict_fn)
    scores = []
    for boxes, batch in iter_patch_batches(image, size, patch, overlap, batch_size):
        batch_scores = np.asarray(run(batch.astype(np.float32)), dtype=np.float32)
        if batch_scores.ndim != 2 or batch_scores.shape[0] != len(boxes):
            raise ValueError(
                f"predict_fn must return (batch, classes) probabilities; for a batch of "
                f"{len(boxes)} patches it returned shape {batch_scores.shape}"
            )
        scores.append(batch_scores)
    class_probs = np.concatenate(scores)
    n = len(grid_positions(size, patch, overlap))
    labels = class_probs.argmax(axis=1).astype(np.int64).reshape(n, n)
    probs = np.clip(class_probs.max(axis=1), 0.0, 1.0).reshape(n, n)
    weights = weighted_lesion_map(labels, probs, size, patch, overlap)
    return LesionMap(weights, labels, probs, class_probs)


def global_input(image, size: int, weights=None) -> np.ndarray:
    """The global net's input: I* = (M / 4) * I (or I itself without `weights`), resized, uint8."""
    image = np.asarray(image)
    array = apply_lesion_map(image, weights) if weights is not None else image.astype(np.float32)
    resized, _ = resize_pad(array, size)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)
