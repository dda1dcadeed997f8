"""Dual2Net's training data: whole photographs resized to the model's input, in a seeded order."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import tensorflow as tf

from rmib import training
from rmib.data import augment as augment_lib
from rmib.data.pipeline import AUTOTUNE, PreprocessedCache, load_examples
from rmib.errors import RmibError
from rmib.losses import sample_rebalanced_pixels
from rmib.methods.dual2net.segmenter import resize_to_model
from rmib.methods.segment_config import SegmentConfig


@dataclasses.dataclass
class ResizedSet:
    """Training photographs resized to the model: images (H, W, 3) uint8, masks (H, W) uint8."""

    names: list
    images: list
    masks: list

    def __len__(self):
        return len(self.images)


PAPER_AUGMENT = "rot90"


def load_resized(records, prep, lesion, image_size, cache_dir=None, on_bad="error", problems=None):
    """Preprocess each record and resize it (and its mask) to `image_size`.

    Only the resized arrays are kept: without a cache directory each
    full-resolution photograph is dropped once resized.
    """
    shared = PreprocessedCache(cache_dir) if cache_dir else None
    names, images, masks = [], [], []
    for record in records:
        cache = shared or PreprocessedCache()
        examples, _ = load_examples([record], prep, lesion, cache, on_bad, problems)
        for example in examples:
            image, _ = resize_to_model(np.asarray(example.image), image_size)
            mask, _ = resize_to_model(np.asarray(example.mask), image_size, cv2.INTER_NEAREST)
            names.append(example.name)
            images.append(np.ascontiguousarray(image, np.uint8))
            masks.append(np.ascontiguousarray(mask, np.uint8))
    return ResizedSet(names, images, masks)


def _epoch_order(n: int, count: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """`count` image indices: permutations of range(n) back to back, from (seed, epoch, stream)."""
    rng = np.random.default_rng([seed, int(epoch), stream])
    rounds = max(1, math.ceil(count / n))
    return np.concatenate([rng.permutation(n) for _ in range(rounds)])[:count]


def training_dataset(
    data: ResizedSet,
    batch_size: int,
    steps_per_epoch: int,
    *,
    dual: bool = True,
    pos_fraction: float = 0.5,
    augment: str = PAPER_AUGMENT,
    seed: int = 0,
    start_epoch: int = 0,
    epochs: int = 1,
):
    """The training batches of epochs `start_epoch` .. `epochs` - 1, back to back.

    With `dual`: ((x_large, x_small), (y_large, y_small, counts_small)), two
    independently drawn batches; else (x, y). x float32 (B, H, W, 3) in
    [0, 255], y float32 (B, H, W, 1) of 0/1, counts float32 (B, H, W, 1).
    """
    if not len(data):
        raise RmibError("no training images to build the Dual2Net dataset from")
    height, width = data.images[0].shape[:2]
    per_epoch = steps_per_epoch * batch_size
    signature = (
        tf.TensorSpec((height, width, 3), tf.uint8),
        tf.TensorSpec((height, width), tf.uint8),
    )

    def generate(epoch, stream):
        for index in _epoch_order(len(data), per_epoch, seed, epoch, stream):
            yield data.images[index], data.masks[index]

    def stream_dataset(epoch, stream, sampled):
        ds = tf.data.Dataset.from_generator(
            generate, output_signature=signature, args=(epoch, stream)
        ).enumerate()

        def finish(index, pair):
            image, mask = pair
            base = augment_lib.example_seed(seed, epoch, index + stream * per_epoch)
            augment_seed, sample_seed = tf.unstack(
                tf.random.experimental.stateless_split(base, num=2)
            )
            image, mask = augment_lib.augment_pair(
                tf.cast(image, tf.float32),
                tf.cast(mask, tf.float32)[..., None],
                augment_seed,
                mode=augment,
            )
            if not sampled:
                return image, mask
            counts = sample_rebalanced_pixels(mask[None], pos_fraction, seed=sample_seed)[0]
            return image, mask, counts

        return ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True).batch(
            batch_size, drop_remainder=True
        )

    def make_epoch(epoch):
        if not dual:
            return stream_dataset(epoch, 0, sampled=False)
        large = stream_dataset(epoch, 0, sampled=False)
        small = stream_dataset(epoch, 1, sampled=True)
        return tf.data.Dataset.zip(large, small).map(
            lambda a, b: ((a[0], b[0]), (a[1], b[1], b[2]))
        )

    epochs_ds = tf.data.Dataset.range(start_epoch, max(epochs, start_epoch + 1))
    return epochs_ds.flat_map(make_epoch).prefetch(AUTOTUNE)


def steps_per_epoch(cfg: SegmentConfig, n_images: int) -> int:
    """`[train] steps_per_epoch`, else enough (global) batches for every image to reach
    each branch once."""
    batch = training.global_batch_size(cfg.train)
    return cfg.train.steps_per_epoch or max(1, math.ceil(n_images / batch))
