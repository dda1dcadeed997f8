"""Layers shared by rmib's models: CBAM, the ImageNet "caffe" preprocessing, a fused BN.

CBAM is the Convolutional Block Attention Module of Woo et al., "CBAM: Convolutional
Block Attention Module", ECCV 2018 (https://arxiv.org/abs/1807.06521).
"""

from __future__ import annotations

import keras
from keras import ops

from rmib.choices import CBAM_INITS

# keras.applications "caffe" mode: RGB -> BGR, then subtract the ImageNet mean (BGR order).
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="rmib")
class CBAM(keras.layers.Layer):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018).

    Channel attention, then spatial attention, applied to a channels-last feature map f:

        Mc = sigmoid(MLP(avgpool_hw(f)) + MLP(maxpool_hw(f)))      shape (B, 1, 1, C)
        f' = f * Mc
        Ms = sigmoid(conv_kxk([mean_c(f'), max_c(f')]))            shape (B, H, W, 1)
        out = f' * Ms

    The MLP is shared by both descriptors: Dense(max(1, C // ratio), ReLU) then
    Dense(C), both with biases. Pooling for the channel attention is over the spatial
    axes (the authors' public notebooks of Ortiz-Feregrino et al. pool over channels,
    which is not CBAM). Computation follows the layer's dtype policy (e.g. bfloat16
    under "mixed_bfloat16"); variables stay float32.

    Initialisation (docs/CBAM.md has the whole story). Each gate multiplies the
    signal by a sigmoid, so a module whose logits start near 0 halves every
    feature twice (Mc ~ Ms ~ 0.5): a quarter of the signal per module. VGG16
    stacks five modules and ResNet50 sixteen, so an untrained encoder with CBAM
    loses its deep features (the P4 tap of a from-scratch VGG16-CBAM had a
    standard deviation of ~1e-3, and a frozen stage-1 encoder built on it gave a
    validation AUPR of 0.002 on synthetic exudates; CHANGELOG.md, second session).

    - `init="identity"` (rmib's default) starts every module as a near-identity
      gate: the two layers that produce attention logits (the MLP's output layer
      and the kxk convolution) have zero kernels and a positive bias, gate_bias / 2
      for the MLP's output (the MLP runs twice, once per descriptor) and gate_bias
      for the convolution, so Mc = sigmoid(gate_bias) and Ms = sigmoid(gate_bias)
      whatever the input (0.95 each for the default 3, 0.91 for the module), and
      attention is learned from there. The MLP's hidden layer keeps Keras' default
      (Glorot-uniform kernel, zero bias).
    - `init="woo"` is the reference start, for comparisons: every kernel Keras'
      default, Glorot-uniform (both Dense layers and the kxk convolution), every
      bias zero, no gate bias (`gate_bias` is ignored): Mc = sigmoid(MLP(avg) +
      MLP(max)) and Ms = sigmoid(conv(...)) of the raw attention logits, both
      input-dependent around 0.5.

    How "woo" differs from Woo et al.'s PyTorch code (Jongchan/attention-module,
    MODELS/cbam.py, initialised by ResidualNet in MODELS/model_resnet.py): the
    MLP's `nn.Linear` kernels keep PyTorch's default kaiming-uniform (a=sqrt(5),
    i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)): for a square layer 1/sqrt(3) of
    Glorot-uniform's limit); its biases exist and start at zero as here
    (ResidualNet zeroes every bias; a bare `CBAM` module would draw them from the
    kernel's range). The 7x7 convolution has no bias and is followed by batch norm
    whose scale ResidualNet sets to 0, so the reference spatial gate starts at
    exactly sigmoid(0) = 0.5 at every pixel (its kaiming-normal kernel only acts
    once that scale moves), where "woo"'s Glorot kernel makes it input-dependent
    from the start; rmib's convolution carries a bias instead of the batch norm
    (the form a conv + BN takes once folded). Both starts give the same
    architecture and weight shapes; trained or loaded weights replace either.

    Args:
        ratio: channel reduction ratio r of the MLP's hidden layer.
        kernel_size: side k of the spatial attention convolution (odd).
        gate_bias: with `init="identity"`, the starting logit of both gates
            (sigmoid(3) = 0.95 each); ignored by "woo", whose biases start at zero.
        init: "identity" (near-identity gate, the default) or "woo" (Keras'
            default kernels, zero biases: the reference start), see above.
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    Raises:
        ValueError: a ratio or kernel size out of range, an unknown `init`.

    Example:
        >>> y = CBAM(ratio=16, kernel_size=7)(keras.ops.ones((2, 8, 8, 32)))
        >>> tuple(y.shape)
        (2, 8, 8, 32)
    """

    # How `call` trains under TensorFlow: "fused" (cbam_training's own gradient) or
    # "plain" (`attend` and automatic differentiation; the code before issue #19).
    implementation = "fused"

    def __init__(self, ratio=16, kernel_size=7, gate_bias=3.0, init="identity", **kwargs):
        super().__init__(**kwargs)
        if init not in CBAM_INITS:
            raise ValueError(f"init must be one of {', '.join(CBAM_INITS)}, got {init!r}")
        if int(ratio) < 1:
            raise ValueError(f"ratio must be a positive integer, got {ratio}")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.ratio = int(ratio)
        self.kernel_size = int(kernel_size)
        self.gate_bias = float(gate_bias)
        self.init = init
        self.supports_masking = False

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"CBAM needs a known channel count, got input shape {input_shape}")
        hidden = max(1, channels // self.ratio)
        policy = self.dtype_policy
        self.mlp_hidden = keras.layers.Dense(
            hidden, activation="relu", dtype=policy, name="mlp_hidden"
        )
        if self.init == "identity":
            # The layers that produce the two attention logits start with zero kernels
            # and a positive bias: a near-identity gate (see the class doc).
            logit_kernel = "zeros"
            channel_bias = keras.initializers.Constant(self.gate_bias / 2)
            spatial_bias = keras.initializers.Constant(self.gate_bias)
        else:  # "woo": Keras' default kernel, zero biases
            logit_kernel, channel_bias, spatial_bias = "glorot_uniform", "zeros", "zeros"
        self.mlp_output = keras.layers.Dense(
            channels,
            dtype=policy,
            name="mlp_output",
            kernel_initializer=logit_kernel,
            bias_initializer=channel_bias,
        )
        # A bias, like the conv+BN of the reference implementation folded at inference.
        self.spatial_conv = keras.layers.Conv2D(
            1,
            self.kernel_size,
            padding="same",
            dtype=policy,
            name="spatial_conv",
            kernel_initializer=logit_kernel,
            bias_initializer=spatial_bias,
        )
        self.mlp_hidden.build((None, channels))
        self.mlp_output.build((None, hidden))
        self.spatial_conv.build((None, None, None, 2))
        # Sublayers made after `trainable=False` was set (e.g. when loading a frozen
        # encoder) would otherwise come back trainable.
        for layer in (self.mlp_hidden, self.mlp_output, self.spatial_conv):
            layer.trainable = self.trainable
        self.built = True

    def call(self, inputs, training=None):
        if training and self.implementation != "plain" and keras.backend.backend() == "tensorflow":
            return self._fused(inputs)
        return self.attend(inputs)

    def _fused(self, inputs):
        from rmib.models.cbam_training import cbam_attention

        dtype = self.compute_dtype
        weights = [
            ops.cast(w, dtype)
            for layer in (self.mlp_hidden, self.mlp_output, self.spatial_conv)
            for w in (layer.kernel, layer.bias)
        ]
        return cbam_attention(ops.cast(inputs, dtype), *weights)

    def attend(self, inputs):
        """CBAM's formula in Keras ops, as written in the class doc (any backend).

        Training under TensorFlow takes `rmib.models.cbam_training.cbam_attention`
        instead: the same output, the same gradients (ties of a maximum aside), with
        fewer passes over the map. Set `implementation = "plain"` on a layer to train
        it with this formula and automatic differentiation.
        """
        average = ops.mean(inputs, axis=(1, 2))
        maximum = ops.max(inputs, axis=(1, 2))
        # One pass through the shared MLP for both descriptors.
        descriptors = ops.concatenate([average, maximum], axis=0)
        scores = self.mlp_output(self.mlp_hidden(descriptors))
        batch = ops.shape(inputs)[0]
        channel_attention = ops.sigmoid(scores[:batch] + scores[batch:])
        refined = inputs * channel_attention[:, None, None, :]
        pooled = ops.concatenate(
            [
                ops.mean(refined, axis=-1, keepdims=True),
                ops.max(refined, axis=-1, keepdims=True),
            ],
            axis=-1,
        )
        spatial_attention = ops.sigmoid(self.spatial_conv(pooled))
        return refined * spatial_attention

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "ratio": self.ratio,
                "kernel_size": self.kernel_size,
                "gate_bias": self.gate_bias,
                "init": self.init,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="rmib")
class ImageNetPreprocessing(keras.layers.Layer):
    """keras.applications "caffe" preprocessing inside the model: RGB -> BGR, minus the mean.

    Inputs are RGB images with values in [0, 255]; the output is what
    `keras.applications.vgg16.preprocess_input` / `resnet.preprocess_input` give, so
    ImageNet weights of VGG16 and ResNet50 see the inputs they were trained on.
    Always computes in float32 (the mean subtraction would lose a bit in bfloat16).

    Args:
        **kwargs: standard `keras.layers.Layer` arguments (name, ...).
    """

    # `rmib.training.devices.with_precision` leaves it in float32 under every policy.
    PINS_FLOAT32 = True

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs):
        mean = ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=self.compute_dtype)
        return ops.flip(inputs, axis=-1) - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return config


@keras.saving.register_keras_serializable(package="rmib")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel when possible.

    Same variables (gamma, beta, moving_mean, moving_variance, in that order), same
    config and same results as the Keras layer, so weights transfer by name both ways
    (e.g. from the keras.applications ResNet50 ImageNet file). Keras 3 normalises with
    about ten separate float32 element-wise ops (it upcasts bfloat16 inputs first);
    TensorFlow's FusedBatchNormV3 does it in one pass in the input's dtype, which is
    what makes mixed bfloat16 training of ResNet50 pay off on CPUs. Falls back to the
    Keras computation for other backends, masks, renorm, synchronized statistics and
    anything that is not a channels-last 4-D tensor.

    Args:
        **kwargs: the arguments of `keras.layers.BatchNormalization`.
    """

    def _fusable(self, inputs, mask):
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and not self.synchronized
            and self.scale
            and self.center
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "bfloat16", "float16")
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # Keras has no fused batch-norm op.

        x = tf.cast(inputs, self.compute_dtype)
        gamma = tf.cast(self.gamma, "float32")
        beta = tf.cast(self.beta, "float32")
        if training and self.trainable:
            outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=tf.zeros([0], "float32"),
                variance=tf.zeros([0], "float32"),
                epsilon=self.epsilon,
                exponential_avg_factor=1.0,
                data_format="NHWC",
                is_training=True,
            )
            # The kernel returns the Bessel-corrected variance; Keras keeps the biased one.
            shape = tf.shape(x)
            count = tf.cast(shape[0] * shape[1] * shape[2], "float32")
            variance = variance * tf.maximum(count - 1.0, 0.0) / count
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            outputs, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon,
                exponential_avg_factor=1.0,
                data_format="NHWC",
                is_training=False,
            )
        return outputs
