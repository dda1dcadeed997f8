"""OpenCV's resizes in TensorFlow ops, for exported graphs that must match rmib's Python code.

Dual2Net resizes the uint8 photograph and the grader the float lesion map
I* (then rounds it): a resize that differs from OpenCV's by one float ulp
can move a value across a rounding boundary and change the model's input by
a whole grey level. `opencv_area_resize` repeats OpenCV's INTER_AREA
arithmetic (its tables, float32 accumulation order and rounding), so an
export's model input is the one rmib's Python code computes, bit for bit.
"""

from __future__ import annotations

import tensorflow as tf

_DBL_EPSILON = 2.220446049250313e-16


def _f64(x):
    return tf.cast(x, tf.float64)


def _area_taps(source, target):
    """OpenCV's INTER_AREA table along one axis (source >= target).

    Returns (index, weight), both (target, K): output pixel i is the sum over
    k of input[index[i, k]] * weight[i, k], in order of k (unused taps weigh 0).
    """
    source_f = _f64(source)
    scale = 1.0 / (_f64(target) / source_f)
    start = _f64(tf.range(target)) * scale
    end = start + scale
    cell = tf.minimum(scale, source_f - start)
    last = tf.minimum(tf.floor(end), source_f - 1.0)
    first = tf.minimum(tf.math.ceil(start), last)
    n_left = tf.cast(first - start > 1e-3, tf.int32)[:, None]
    n_mid = tf.cast(last - first, tf.int32)[:, None]
    n_right = tf.cast(end - last > 1e-3, tf.int32)[:, None]
    w_left = tf.cast((first - start) / cell, tf.float32)[:, None]
    w_mid = tf.cast(1.0 / cell, tf.float32)[:, None]
    w_right = tf.cast(tf.minimum(tf.minimum(end - last, 1.0), cell) / cell, tf.float32)[:, None]
    count = n_left + n_mid + n_right
    k = tf.range(tf.reduce_max(count))[None, :]
    first_i, last_i = tf.cast(first, tf.int32)[:, None], tf.cast(last, tf.int32)[:, None]
    is_left = k < n_left
    is_mid = (k >= n_left) & (k < n_left + n_mid)
    is_right = (k >= n_left + n_mid) & (k < count)
    zeros = tf.zeros_like(k)
    index = tf.where(
        is_left,
        first_i - 1 + zeros,
        tf.where(is_mid, first_i + k - n_left, tf.where(is_right, last_i + zeros, zeros)),
    )
    none = tf.zeros(tf.shape(index), tf.float32)
    weight = tf.where(
        is_left,
        w_left + none,
        tf.where(is_mid, w_mid + none, tf.where(is_right, w_right + none, none)),
    )
    return index, weight


def _weighted_taps(values, index, weight, axis: int):
    """sum_k values[index[:, k]] * weight[:, k] along `axis`, accumulated in OpenCV's order."""
    shape = [1, 1, 1]
    shape[axis] = -1
    out_shape = tf.tensor_scatter_nd_update(tf.shape(values), [[axis]], tf.shape(index)[:1])

    def body(k, total):
        taken = tf.gather(values, index[:, k], axis=axis)
        return k + 1, total + taken * tf.reshape(weight[:, k], shape)

    _, total = tf.while_loop(
        lambda k, _: k < tf.shape(index)[1],
        body,
        [tf.constant(0), tf.zeros(out_shape, tf.float32)],
        shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None, values.shape[-1]])],
        parallel_iterations=1,
    )
    return total


def to_uint8(values):
    """Float -> uint8 as OpenCV's ``saturate_cast``: rounded (halves to even), clipped."""
    return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), tf.uint8)


def _area_shrinking(image, height, width):
    source = tf.cast(image, tf.float32)
    index, weight = _area_taps(tf.shape(source)[1], width)
    rows = _weighted_taps(source, index, weight, axis=1)
    index, weight = _area_taps(tf.shape(source)[0], height)
    out = _weighted_taps(rows, index, weight, axis=0)
    return to_uint8(out) if image.dtype == tf.uint8 else out


def _area_integer(image, height, width):
    """Integer factors on both axes: OpenCV's fast path (block sums, one multiplication)."""
    size = tf.shape(image)
    step_y, step_x = size[0] // height, size[1] // width
    channels = image.shape[-1]
    blocks = tf.reshape(
        image[: height * step_y, : width * step_x],
        tf.stack([height, step_y, width, step_x, channels]),
    )
    area = step_y * step_x
    blocks = tf.reshape(
        tf.transpose(blocks, [1, 3, 0, 2, 4]), tf.stack([area, height, width, channels])
    )
    inverse = tf.constant(1.0, tf.float32) / tf.cast(area, tf.float32)
    if image.dtype == tf.uint8:
        total = tf.reduce_sum(tf.cast(blocks, tf.int32), axis=0)
        halves_up = tf.bitwise.right_shift(total + 2, 2)  # OpenCV's SIMD 2 x 2 path
        even = tf.cast(to_uint8(tf.cast(total, tf.float32) * inverse), tf.int32)
        two_by_two = tf.equal(step_y, 2) & tf.equal(step_x, 2)
        return tf.cast(tf.where(two_by_two, halves_up, even), tf.uint8)
    blocks = tf.cast(blocks, tf.float32)
    fours = area // 4

    def four(i, total):
        j = 4 * i
        return i + 1, total + (((blocks[j] + blocks[j + 1]) + blocks[j + 2]) + blocks[j + 3])

    def one(j, total):
        return j + 1, total + blocks[j]

    zero = tf.zeros(tf.shape(blocks)[1:], tf.float32)
    _, total = tf.while_loop(
        lambda i, _: i < fours, four, [tf.constant(0), zero], parallel_iterations=1
    )
    _, total = tf.while_loop(lambda j, _: j < area, one, [4 * fours, total], parallel_iterations=1)
    return total * inverse


def _enlarging_coefficients(source, target):
    """OpenCV's INTER_AREA coefficients when an axis grows: (first, second, fraction)."""
    inverse = _f64(target) / _f64(source)
    scale = 1.0 / inverse
    position = _f64(tf.range(target))
    start = tf.floor(position * scale)
    fraction = tf.cast((position + 1.0) - (start + 1.0) * inverse, tf.float32)
    fraction = tf.where(fraction <= 0.0, 0.0, fraction - tf.floor(fraction))
    start = tf.cast(start, tf.int32)
    fraction = tf.where(start < 0, 0.0, fraction)
    start = tf.maximum(start, 0)
    fraction = tf.where(start >= source - 1, 0.0, fraction)
    start = tf.minimum(start, source - 1)
    return start, tf.minimum(start + 1, source - 1), fraction


def _area_enlarging(image, height, width):
    """INTER_AREA when either axis grows: OpenCV's bilinear variant (fixed point for uint8)."""
    size = tf.shape(image)
    x0, x1, fx = _enlarging_coefficients(size[1], width)
    y0, y1, fy = _enlarging_coefficients(size[0], height)
    if image.dtype == tf.uint8:

        def fixed(fraction):  # 11 fractional bits, OpenCV's INTER_RESIZE_COEF_BITS
            return tf.cast(tf.round(fraction * 2048.0), tf.int32)

        shift = tf.bitwise.right_shift
        source = tf.cast(image, tf.int32)
        rows = tf.gather(source, x0, axis=1) * fixed(1.0 - fx)[None, :, None]
        rows += tf.gather(source, x1, axis=1) * fixed(fx)[None, :, None]
        top = shift(fixed(1.0 - fy)[:, None, None] * shift(tf.gather(rows, y0, axis=0), 4), 16)
        bottom = shift(fixed(fy)[:, None, None] * shift(tf.gather(rows, y1, axis=0), 4), 16)
        return tf.cast(tf.clip_by_value(shift(top + bottom + 2, 2), 0, 255), tf.uint8)
    source = tf.cast(image, tf.float32)
    fx, fy = fx[None, :, None], fy[:, None, None]
    rows = tf.gather(source, x0, axis=1) * (1.0 - fx) + tf.gather(source, x1, axis=1) * fx
    return tf.gather(rows, y0, axis=0) * (1.0 - fy) + tf.gather(rows, y1, axis=0) * fy


def opencv_area_resize(image, height, width):
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)`` in TensorFlow ops.

    Bit for bit what OpenCV (4.x and 5.x, CPU) computes: its area tables and
    float32 accumulation order when shrinking, its block-sum fast path for
    integer factors (halves rounded up in the uint8 2 x 2 case, as its SIMD
    code does), and its bilinear variant when an axis grows (fixed point with
    11 fractional bits for uint8).

    Args:
        image: (H, W, C) uint8 or float32 tensor, C known.
        height, width: the output size (ints or int32 scalars).

    Returns:
        (height, width, C) tensor of the image's dtype.
    """
    size = tf.shape(image)
    height = tf.convert_to_tensor(height, tf.int32)
    width = tf.convert_to_tensor(width, tf.int32)
    scale_y = 1.0 / (_f64(height) / _f64(size[0]))
    scale_x = 1.0 / (_f64(width) / _f64(size[1]))
    shrinking = (scale_x >= 1.0) & (scale_y >= 1.0)
    integer = (tf.abs(scale_x - tf.round(scale_x)) < _DBL_EPSILON) & (
        tf.abs(scale_y - tf.round(scale_y)) < _DBL_EPSILON
    )
    out = tf.case(
        [
            (shrinking & integer, lambda: _area_integer(image, height, width)),
            (shrinking, lambda: _area_shrinking(image, height, width)),
        ],
        default=lambda: _area_enlarging(image, height, width),
        exclusive=False,
    )
    return tf.ensure_shape(out, [None, None, image.shape[-1]])


def bilinear_resize(values, height, width):
    """(h, w) float32 -> (height, width): ``cv2.INTER_LINEAR`` (half-pixel centres).

    No rounding follows it, so TensorFlow's own bilinear resize, within a few
    float32 ulps of OpenCV's, is enough here.
    """
    out = tf.image.resize(values[None, :, :, None], tf.stack([height, width]), method="bilinear")
    return out[0, :, :, 0]


__all__ = ["bilinear_resize", "opencv_area_resize", "to_uint8"]
