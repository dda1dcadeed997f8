"""The local-global U-Net's training data: whole photographs for GlobalNet, boxed patches for LocalNet and the fusion."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from rmib import io
from rmib.data import augment as augment_lib
from rmib.data.pipeline import (
    AUTOTUNE,
    PatchSampler,
    PreprocessedCache,
    Preprocessing,
    load_examples,
)
from rmib.errors import BadInputError
from rmib.methods.local_global.model import resize_global
from rmib.methods.local_global.segmenter import _fits_centre_crop
from rmib.methods.segment_config import SegmentConfig


@dataclasses.dataclass
class Photographs:
    """Preprocessed photographs with their GlobalNet views.

    Attributes:
        examples: `rmib.data.pipeline.Example`s (full resolution, mask, FOV).
        global_images: each photograph resized to global_size, uint8.
        global_masks: each mask resized by area (lesion fraction), float32 (G, G).
        cropped: how many photographs got the IDRiD centre crop.
    """

    examples: list
    global_images: list
    global_masks: list
    cropped: int = 0


def _preprocessing_for(record, method: str, centre_crop: bool) -> Preprocessing:
    if centre_crop:
        try:
            width, height = io.image_size(record.image)
        except BadInputError:  # load_examples reports the file as the run's on_bad says
            return Preprocessing(method=method)
        if _fits_centre_crop((height, width)):
            return Preprocessing(method=method, centre_crop=True)
    return Preprocessing(method=method)


def load_photographs(records, cfg: SegmentConfig, global_size: int, cache=None, problems=None):
    """Preprocess `records` for `cfg.lesion` and make their GlobalNet views."""
    cache = cache or PreprocessedCache(cfg.cache_dir or None)
    examples, global_images, global_masks, cropped = [], [], [], 0
    for record in records:
        prep = _preprocessing_for(record, cfg.preprocessing, cfg.local_global.centre_crop)
        loaded, _ = load_examples([record], prep, cfg.lesion, cache, cfg.on_bad, problems)
        for example in loaded:
            examples.append(example)
            cropped += int(prep.centre_crop)
            global_images.append(resize_global(example.image, global_size))
            mask = np.asarray(example.mask) > 0
            global_masks.append(resize_global(mask.astype(np.float32), global_size))
    return Photographs(examples, global_images, global_masks, cropped)


class BoxPatchSampler(PatchSampler):
    """`PatchSampler` that also says where the patch lies: its normalised box."""

    def sample_with_box(self, rng):
        """(photograph index, patch uint8 (p, p, 3), mask uint8 (p, p), box float32 (4,)).

        The box is (top / H, left / W, (top + p) / H, (left + p) / W) of the
        photograph (beyond 1 when the photograph is smaller than the patch).
        """
        index = int(rng.integers(len(self.examples)))
        example = self.examples[index]
        y, x = self._centre(index, rng)
        p = self.patch
        height, width = example.image.shape[:2]
        top = int(np.clip(y - p // 2, 0, max(height - p, 0)))
        left = int(np.clip(x - p // 2, 0, max(width - p, 0)))
        image, mask = self.crop(example, top, left)
        box = np.array(
            [top / height, left / width, (top + p) / height, (left + p) / width], np.float32
        )
        return index, image, mask, box


def rotate_box(box, k):
    """A normalised (y0, x0, y1, x1) box after k counter-clockwise quarter turns
    of its image (`tf.image.rot90`): one turn maps (y, x) to (1 - x, y)."""
    box = tf.convert_to_tensor(box, tf.float32)
    y0, x0, y1, x1 = tf.unstack(box, axis=-1)
    turns = tf.stack(
        [
            tf.stack([y0, x0, y1, x1], -1),
            tf.stack([1 - x1, y0, 1 - x0, y1], -1),
            tf.stack([1 - y1, 1 - x1, 1 - y0, 1 - x0], -1),
            tf.stack([x0, 1 - y1, x1, 1 - y0], -1),
        ]
    )
    return tf.gather(turns, tf.math.floormod(tf.cast(k, tf.int32), 4))


def rotate_fused_example(global_image, global_mask, patch, patch_mask, box, k):
    """Quarter-turn augmentation of one fused example: the same k turns for all of it.

    Args:
        global_image, global_mask: (G, G, C) tensors.
        patch, patch_mask: (p, p, C) tensors.
        box: (4,) the patch's normalised box in the photograph.
        k: number of counter-clockwise quarter turns (`tf.image.rot90`).

    Returns:
        The five, rotated; the patch stays the photograph's pixels inside the box.
    """
    turned = [tf.image.rot90(t, k) for t in (global_image, global_mask, patch, patch_mask)]
    return (*turned, rotate_box(box, k))


def augment_soft_pair(
    image, mask, seed, mode="free", max_rotation=180.0, zoom_range=0.1, noise_std=4.0
):
    """Augment an image and a soft (fractional) mask identically.

    As `rmib.data.augment.augment_pair`, except that in "free" mode the mask
    is resampled bilinearly and not rounded, so GlobalNet's lesion fractions survive.
    """
    if mode == "none":
        return image, mask
    if mode != "free":
        return augment_lib.augment_pair(image, mask, seed, mode=mode)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    channels = image.shape[-1]
    stack = tf.concat([image, mask], axis=-1)
    stack = tf.cond(
        tf.random.stateless_uniform([], seeds[0]) < 0.5,
        lambda: tf.reverse(stack, [1]),
        lambda: stack,
    )
    stack = tf.cond(
        tf.random.stateless_uniform([], seeds[1]) < 0.5,
        lambda: tf.reverse(stack, [0]),
        lambda: stack,
    )
    limit = max_rotation * math.pi / 180.0
    angle = tf.random.stateless_uniform([], seeds[2], -limit, limit)
    zoom = tf.random.stateless_uniform([], seeds[3], 1.0 - zoom_range, 1.0 + zoom_range)
    shape = tf.shape(stack)
    transform = augment_lib.rotation_zoom_transform(angle, zoom, shape[0], shape[1])
    stack = keras.ops.image.affine_transform(
        stack[None], transform[None], interpolation="bilinear", fill_mode="constant"
    )[0]
    image, mask = stack[..., :channels], stack[..., channels:]
    if noise_std > 0:
        image = image + tf.random.stateless_normal(tf.shape(image), seeds[4], stddev=noise_std)
    return tf.clip_by_value(image, 0.0, 255.0), tf.clip_by_value(mask, 0.0, 1.0)


def _epochs(start_epoch, epochs, make_epoch):
    return (
        tf.data.Dataset.range(start_epoch, max(epochs, start_epoch + 1))
        .flat_map(make_epoch)
        .prefetch(AUTOTUNE)
    )


def _cycled_order(rng, n, count):
    order = []
    while len(order) < count:
        order.extend(rng.permutation(n).tolist())
    return order[:count]


def global_dataset(
    photos: Photographs, batch_size, steps, *, augment="free", seed=0, start_epoch=0, epochs=1
):
    """Batches of (whole photograph resized float32 (G, G, 3), lesion fraction (G, G, 1))."""
    n = len(photos.global_images)
    size = photos.global_images[0].shape[0]
    per_epoch = steps * batch_size

    def generate(epoch):
        rng = np.random.default_rng([seed, 1, int(epoch)])
        for index in _cycled_order(rng, n, per_epoch):
            yield photos.global_images[index], photos.global_masks[index]

    signature = (
        tf.TensorSpec((size, size, 3), tf.uint8),
        tf.TensorSpec((size, size), tf.float32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, pair):
            image, mask = pair
            image, mask = augment_soft_pair(
                tf.cast(image, tf.float32),
                mask[..., None],
                augment_lib.example_seed(seed, epoch, index),
                mode=augment,
            )
            return image, mask

        return (
            ds.enumerate()
            .map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
        )

    return _epochs(start_epoch, epochs, make_epoch)


def fused_dataset(
    photos: Photographs,
    patch_size,
    batch_size,
    steps,
    *,
    pos_fraction=0.5,
    augment="rot90",
    seed=0,
    start_epoch=0,
    epochs=1,
):
    """Batches of ({"global_image", "patch", "box"}, {"global", "local"}) for the fused net.

    Patches are lesion-aware (`BoxPatchSampler`); with augment other than
    "none", each example turns by the same random multiple of 90 degrees
    as a whole (`rotate_fused_example`).
    """
    sampler = BoxPatchSampler(photos.examples, patch_size, pos_fraction)
    size = photos.global_images[0].shape[0]
    p = int(patch_size)
    per_epoch = steps * batch_size

    def generate(epoch):
        rng = np.random.default_rng([seed, 3, int(epoch)])
        for _ in range(per_epoch):
            index, patch, mask, box = sampler.sample_with_box(rng)
            yield photos.global_images[index], photos.global_masks[index], patch, mask, box

    signature = (
        tf.TensorSpec((size, size, 3), tf.uint8),
        tf.TensorSpec((size, size), tf.float32),
        tf.TensorSpec((p, p, 3), tf.uint8),
        tf.TensorSpec((p, p), tf.uint8),
        tf.TensorSpec((4,), tf.float32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, example):
            global_image, global_mask, patch, mask, box = example
            global_image = tf.cast(global_image, tf.float32)
            patch = tf.cast(patch, tf.float32)
            global_mask = global_mask[..., None]
            mask = tf.cast(mask, tf.float32)[..., None]
            if augment != "none":
                k = tf.random.stateless_uniform(
                    [], augment_lib.example_seed(seed, epoch, index), 0, 4, dtype=tf.int32
                )
                global_image, global_mask, patch, mask, box = rotate_fused_example(
                    global_image, global_mask, patch, mask, box, k
                )
            inputs = {"global_image": global_image, "patch": patch, "box": box}
            return inputs, {"global": global_mask, "local": mask}

        return (
            ds.enumerate()
            .map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
        )

    return _epochs(start_epoch, epochs, make_epoch)
