"""`predict_tiled`'s tile grid in TensorFlow ops, for graphs that serve whole photographs.

The exported ``segment_image`` signatures (`rmib.export`) tile a photograph of
any size inside the SavedModel. They must give what `rmib predict` gives, so
this module repeats `rmib.inference.tiling.predict_tiled` op for op: the same
grid (the last tile flush with the edge), the same reflect padding of an
image smaller than the tile, the same separable Gaussian window and weighted
mean; tests/inference/test_tiling_tf.py holds the two to the same answer.
"""

from __future__ import annotations

import tensorflow as tf

from rmib.inference.tiling import weight_window
from rmib.inference.tta import IDENTITY, transforms


def reflect_indices(length, padded_length):
    """Source rows of NumPy's ``np.pad(mode="reflect")`` (any pad width), as a triangle wave."""
    index = tf.range(padded_length)
    period = tf.maximum(2 * (length - 1), 1)
    index = tf.math.floormod(index, period)
    return tf.where(index < length, index, period - index)


def tile_starts(length, tile: int, stride: int):
    """`rmib.inference.tiling.tile_grid` in TensorFlow ops (``length >= tile``)."""
    regular = tf.range(0, length - tile, stride)
    return tf.concat([regular, tf.reshape(length - tile, [1])], axis=0)


def tiled_probability(
    predict_fn, image, fov, tile: int, overlap: float, batch_size: int, depth=1, with_boxes=False
):
    """`rmib.inference.predict_tiled` in TensorFlow ops, for a graph that serves whole images.

    Same tile grid (the last tile flush with the edge), reflect padding of an
    image smaller than the tile, skipping of tiles wholly outside the field of
    view, the same separable Gaussian window and weighted mean, and 0 outside
    the field of view.

    Args:
        predict_fn: (B, tile, tile, C) float32 -> (B, tile, tile, depth)
            float32; with `with_boxes`, (tiles, boxes (B, 4) float32) -> the same.
        image: (H, W, C) float32 tensor.
        fov: (H, W) tensor, non-zero inside the field of view.
        tile, overlap, batch_size: as for `predict_tiled`.
        depth: channels of the prediction.
        with_boxes: also pass each tile's normalised box (y0, x0, y1, x1) in the
            unpadded image, as ``predict_tiled(with_boxes=True)`` does.

    Returns:
        float32 tensor (H, W, depth).

    Raises:
        ValueError: an overlap outside [0, 1).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded_h, padded_w = tf.maximum(height, tile), tf.maximum(width, tile)
    rows = reflect_indices(height, padded_h)
    cols = reflect_indices(width, padded_w)
    padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
    stride = max(1, tile - round(overlap * tile))
    ys, xs = tile_starts(padded_h, tile, stride), tile_starts(padded_w, tile, stride)
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    positions = tf.stack([tf.reshape(grid_y, [-1]), tf.reshape(grid_x, [-1])], axis=1)

    # Tiles with no field-of-view pixel are skipped (their output is zeroed
    # anyway); a summed-area table counts the pixels of every tile at once.
    inside = tf.cast(tf.not_equal(fov, 0), tf.int32)
    inside = tf.pad(inside, [[1, padded_h - height], [1, padded_w - width]])
    table = tf.cumsum(tf.cumsum(inside, axis=0), axis=1)
    y0, x0 = positions[:, 0], positions[:, 1]
    y1, x1 = y0 + tile, x0 + tile

    def corner(y, x):
        return tf.gather_nd(table, tf.stack([y, x], axis=1))

    count = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
    in_view = tf.boolean_mask(positions, count > 0)
    positions = tf.cond(
        tf.size(in_view) > 0, lambda: in_view, lambda: positions[:1], name="tiles_in_view"
    )

    window = tf.constant(weight_window(tile))
    offsets = tf.range(tile)
    total = tf.shape(positions)[0]
    batches = (total + batch_size - 1) // batch_size
    output = tf.zeros(tf.stack([padded_h, padded_w, depth]), tf.float32)
    weight_sum = tf.zeros(tf.stack([padded_h, padded_w]), tf.float32)
    size = tf.cast(tf.stack([height, width, height, width]), tf.float64)

    def body(i, output, weight_sum):
        batch = positions[i * batch_size : tf.minimum((i + 1) * batch_size, total)]
        tile_rows = batch[:, 0:1] + offsets[None, :]  # (b, tile)
        tile_cols = batch[:, 1:2] + offsets[None, :]
        tiles = tf.gather(padded, tile_rows, axis=0)  # (b, tile, W, C)
        tiles = tf.gather(tiles, tile_cols, axis=2, batch_dims=1)  # (b, tile, tile, C)
        tiles = tf.ensure_shape(tiles, [None, tile, tile, image.shape[-1]])
        if with_boxes:
            # As predict_tiled: y / H in float64, then float32.
            corners = tf.cast(tf.concat([batch, batch + tile], axis=1), tf.float64)
            boxes = tf.cast(corners / size, tf.float32)
            prediction = predict_fn(tiles, boxes)
        else:
            prediction = predict_fn(tiles)
        prediction = tf.ensure_shape(prediction, [None, tile, tile, depth])
        b = tf.shape(batch)[0]
        index = tf.stack(
            [
                tf.broadcast_to(tile_rows[:, :, None], [b, tile, tile]),
                tf.broadcast_to(tile_cols[:, None, :], [b, tile, tile]),
            ],
            axis=-1,
        )
        output = tf.tensor_scatter_nd_add(output, index, prediction * window[None, :, :, None])
        weight_sum = tf.tensor_scatter_nd_add(
            weight_sum, index, tf.broadcast_to(window[None], [b, tile, tile])
        )
        return i + 1, output, weight_sum

    _, output, weight_sum = tf.while_loop(
        lambda i, *_: i < batches,
        body,
        [tf.constant(0), output, weight_sum],
        parallel_iterations=1,
        name="tiles",
    )
    output = output[:height, :width]
    weight_sum = weight_sum[:height, :width, None]
    output = tf.math.divide_no_nan(output, weight_sum)
    return output * tf.cast(tf.not_equal(fov, 0), tf.float32)[:, :, None]


def tta_probability(prob_fn, image, fov, tta: str):
    """`rmib.inference.tta.predict_with_tta` in TensorFlow ops: the mean of the moved-back maps.

    Args:
        prob_fn: ``(image (h, w, C), fov (h, w)) -> (h, w)`` float32 tensors.
        image: (H, W, C) tensor; fov: (H, W) tensor, moved with it.
        tta: one of `rmib.choices.TTA`.

    Returns:
        float32 tensor (H, W): ``prob_fn(image, fov)`` with "none", else the mean of
        the transforms' maps, summed in float64 as the NumPy mean is.
    """
    steps = transforms(tta)
    if steps == (IDENTITY,):
        return prob_fn(image, fov)
    total = None
    for flip_rows, flip_cols, transpose in steps:
        axes = [axis for axis, flip in ((0, flip_rows), (1, flip_cols)) if flip]
        moved, moved_fov = image, fov
        if axes:
            moved, moved_fov = tf.reverse(moved, axes), tf.reverse(moved_fov, axes)
        if transpose:
            moved, moved_fov = tf.transpose(moved, [1, 0, 2]), tf.transpose(moved_fov)
        prob = tf.cast(prob_fn(moved, moved_fov), tf.float64)
        if transpose:
            prob = tf.transpose(prob)
        if axes:
            prob = tf.reverse(prob, axes)
        total = prob if total is None else total + prob
    return tf.cast(total / len(steps), tf.float32)


__all__ = ["reflect_indices", "tile_starts", "tiled_probability", "tta_probability"]
