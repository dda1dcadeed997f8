"""CBAM's training pass with its own gradient: fewer passes over the feature map (TensorFlow).

`rmib.models.layers.CBAM` computes, for a channels-last map x (Woo et al., ECCV 2018):

    Mc  = sigmoid(MLP(mean_hw(x)) + MLP(max_hw(x)))        (B, C)
    r   = x * Mc
    Ms  = sigmoid(conv([mean_c(r), max_c(r)]) + bias)      (B, H, W, 1)
    out = r * Ms

Left to automatic differentiation, every full-size step of this costs TensorFlow a
separate kernel: each `reduce_max` is differentiated as Equal -> Cast -> Sum ->
RealDiv -> Mul over the whole map, each input used twice gets an AddN, and under
mixed_bfloat16 Keras' `ops.mean` casts the map to float32 and back in both passes
(issue #19's profile: CBAM added 31 % to a bfloat16 ResNet50 step). Here the
backward pass is written out. The maximum over the map is a max pool over the whole
map (oneDNN's pooling, vectorised over channels, whose gradient puts each channel's
gradient at its maximum); where the map's size is unknown when traced, and for the
maximum over channels, the forward pass keeps where each maximum is (`argmax`, the
value read back by a gather) and the backward pass adds the gradient at that position
(a scatter of B*C or B*H*W values, not a full-size mask). The means' gradients are
broadcast additions, x's gradient is one expression (no AddN), and the small parts
(the shared MLP on (B, C), the kxk convolution on (B, H, W, 2)) are differentiated
by TensorFlow on their own small tensors. The result and the gradients are those of
the formula above (tests/models/test_layers.py compares them with tf.GradientTape
on the unfused formula); the one difference is a tie: where several elements share
a maximum, TensorFlow's `reduce_max` gradient splits it evenly among them, this one
gives it to the first (as `torch.max(dim)` does). Both are valid subgradients and
they agree wherever the maximum is unique.

Means accumulate in float32 for every input dtype (as Keras' `ops.mean` does),
through a matrix product with a ones vector, which oneDNN accumulates in float32
even for bfloat16 inputs, so no full-size cast is needed.
"""

from __future__ import annotations

import tensorflow as tf


def _sum_over(flat, axis):
    """Sum of a (B, N, C) tensor over axis 1 (-> (B, C)) or 2 (-> (B, N)), float32 accumulation."""
    if axis == 1:
        ones = tf.ones([1, 1, tf.shape(flat)[1]], flat.dtype)
        return tf.matmul(ones, flat)[:, 0, :]
    ones = tf.ones([1, tf.shape(flat)[2], 1], flat.dtype)
    return tf.matmul(flat, ones)[:, :, 0]


def _mean_over(flat, axis):
    """Mean over an axis of a (B, N, C) tensor, in its dtype, accumulated in float32."""
    count = tf.cast(tf.shape(flat)[axis], tf.float32)
    if flat.dtype == tf.float32:
        return tf.reduce_mean(flat, axis=axis)
    return tf.cast(tf.cast(_sum_over(flat, axis), tf.float32) / count, flat.dtype)


def _max_over(flat, axis):
    """(maximum, flat position of the first maximum) over axis 1 or 2 of a (B, N, C) tensor."""
    shape = tf.shape(flat, out_type=tf.int64)
    batch, positions, channels = shape[0], shape[1], shape[2]
    where = tf.argmax(flat, axis=axis, output_type=tf.int64)
    if axis == 1:  # where: (B, C), a position n per channel
        base = tf.range(batch)[:, None] * positions * channels + tf.range(channels)[None, :]
        index = base + where * channels
    else:  # where: (B, N), a channel per position
        index = tf.range(batch * positions)[:, None] * channels + tf.reshape(where, [-1, 1])
        index = tf.reshape(index, [batch, positions])
    return tf.gather(tf.reshape(flat, [-1]), index), index


def _add_at(flat, index, values):
    """`flat` with `values` added at the flat positions `index` (same shape as values)."""
    shape = tf.shape(flat)
    added = tf.tensor_scatter_nd_add(
        tf.reshape(flat, [-1]), tf.reshape(index, [-1, 1]), tf.reshape(values, [-1])
    )
    return tf.reshape(added, shape)


def _channel_logits(average, maximum, w_hidden, b_hidden, w_out, b_out):
    """MLP(average) + MLP(maximum), the shared MLP run once on both descriptors."""
    batch = tf.shape(average)[0]
    hidden = tf.nn.relu(tf.matmul(tf.concat([average, maximum], 0), w_hidden) + b_hidden)
    scores = tf.matmul(hidden, w_out) + b_out
    return scores[:batch] + scores[batch:]


def _spatial_logits(pooled, kernel, bias):
    return tf.nn.conv2d(pooled, kernel, strides=1, padding="SAME") + bias


@tf.custom_gradient
def cbam_attention(x, w_hidden, b_hidden, w_out, b_out, kernel, bias):
    """CBAM's output for x (B, H, W, C), with the weights as tensors of x's dtype.

    Args:
        x: the feature map, channels last.
        w_hidden, b_hidden: the MLP's hidden layer, (C, C/r) and (C/r,).
        w_out, b_out: the MLP's output layer, (C/r, C) and (C,).
        kernel, bias: the spatial convolution, (k, k, 2, 1) and (1,); 'same' padding.

    Returns:
        out = x * Mc * Ms, and (to TensorFlow) its gradient function.
    """
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0], shape[1] * shape[2], shape[3]])
    average = _mean_over(flat, 1)
    window = [1, *x.shape[1:3], 1]
    if None in window:
        maximum, where_hw = _max_over(flat, 1)
    else:  # a max pool over the whole map: oneDNN, vectorised over channels, both ways
        pooled_hw = tf.nn.max_pool2d(x, window, window, "VALID")
        maximum = tf.reshape(pooled_hw, [shape[0], shape[3]])
    weights = (w_hidden, b_hidden, w_out, b_out)
    channel = tf.sigmoid(_channel_logits(average, maximum, *weights))
    refined = flat * channel[:, None, :]
    mean_c = _mean_over(refined, 2)
    max_c, where_c = _max_over(refined, 2)
    pooled = tf.reshape(tf.stack([mean_c, max_c], axis=-1), [shape[0], shape[1], shape[2], 2])
    spatial = tf.reshape(tf.sigmoid(_spatial_logits(pooled, kernel, bias)), [shape[0], -1, 1])
    out = refined * spatial

    def gradient(upstream):
        upstream = tf.reshape(upstream, tf.shape(flat))
        # out = refined * spatial
        d_spatial = tf.reshape(tf.reduce_sum(upstream * refined, axis=-1), tf.shape(mean_c))
        d_refined = upstream * spatial
        with tf.GradientTape() as tape:
            tape.watch([pooled, kernel, bias])
            logits = _spatial_logits(pooled, kernel, bias)
        s = tf.reshape(spatial, tf.shape(logits))
        d_logits = tf.reshape(d_spatial, tf.shape(logits)) * s * (1 - s)
        d_pooled, d_kernel, d_bias = tape.gradient(
            logits, [pooled, kernel, bias], output_gradients=d_logits
        )
        d_pooled = tf.reshape(d_pooled, [shape[0], -1, 2])
        # refined -> mean over channels (broadcast back) and max over channels (scatter)
        channels = tf.cast(shape[3], tf.float32)
        d_mean_c = tf.cast(tf.cast(d_pooled[..., 0], tf.float32) / channels, x.dtype)
        d_refined = _add_at(d_refined + d_mean_c[..., None], where_c, d_pooled[..., 1])
        # refined = flat * channel
        d_channel = tf.reduce_sum(d_refined * flat, axis=1)
        with tf.GradientTape() as tape:
            tape.watch([average, maximum, *weights])
            logits = _channel_logits(average, maximum, *weights)
        d_logits = d_channel * channel * (1 - channel)
        d_average, d_maximum, *d_weights = tape.gradient(
            logits, [average, maximum, *weights], output_gradients=d_logits
        )
        pixels = tf.cast(tf.shape(flat)[1], tf.float32)
        d_average = tf.cast(tf.cast(d_average, tf.float32) / pixels, x.dtype)
        d_flat = d_refined * channel[:, None, :] + d_average[:, None, :]
        if None in window:
            d_x = tf.reshape(_add_at(d_flat, where_hw, d_maximum), shape)
        else:
            d_x = tf.reshape(d_flat, shape) + tf.raw_ops.MaxPoolGrad(
                orig_input=x,
                orig_output=pooled_hw,
                grad=tf.reshape(d_maximum, tf.shape(pooled_hw)),
                ksize=window,
                strides=window,
                padding="VALID",
            )
        return (d_x, *d_weights, d_kernel, d_bias)

    return tf.reshape(out, shape), gradient
