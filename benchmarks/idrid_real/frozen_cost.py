"""The lever "the cost of a frozen encoder": `python -m benchmarks.idrid_real frozen-cost`."""

from __future__ import annotations

import time


def frozen_encoder_cost(size=256, batch=8, warmup=2, steps=5, backbone="vgg16") -> dict:
    """Seconds of one training step of the encoder-decoder: frozen, trainable, and in parts.

    The lever "the cost of a frozen encoder": a frozen step is compared with the
    encoder's forward pass plus a decoder-only step on precomputed features (the same
    decoder layers fed the encoder's taps). If the frozen step is no slower than that
    sum, the backward pass already stops at the encoder and there is nothing to save.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from rmib.methods.encoder_decoder.model import build_encoder_decoder, decode
    from rmib.models.backbones import build_backbone, tap_strides

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    masks = (rng.uniform(size=(batch, size, size, 1)) > 0.95).astype("float32")

    def timed(step) -> float:
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    def train_step_seconds(model, inputs) -> float:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        return timed(lambda: model.train_on_batch(inputs, masks))

    encoder = build_backbone(backbone, cbam=True, weights="none", model_name="backbone")
    frozen = build_encoder_decoder(encoder, freeze_encoder=True)
    result = {"size": size, "batch": batch, "backbone": f"{backbone}_cbam"}
    result["frozen_step"] = train_step_seconds(frozen, images)
    forward = tf.function(lambda x: encoder(x, training=False))
    result["encoder_forward"] = timed(lambda: [t.numpy() for t in forward(images).values()])
    taps = {k: v.numpy() for k, v in forward(images).items()}
    # The decoder alone: the same layers (`decode`) on Inputs shaped like the taps.
    inputs = {k: keras.Input(shape=(None, None, v.shape[-1]), name=k) for k, v in taps.items()}
    decoder = keras.Model(inputs, decode(inputs, tap_strides(encoder)), name="decoder_only")
    result["decoder_step"] = train_step_seconds(decoder, taps)
    encoder.trainable = True
    trainable = build_encoder_decoder(encoder, freeze_encoder=False)
    result["trainable_step"] = train_step_seconds(trainable, images)
    result["frozen_over_parts"] = result["frozen_step"] / (
        result["encoder_forward"] + result["decoder_step"]
    )
    return result
