"""tf.data pipelines: classification images, lesion-aware segmentation patches, whole images.

Decoding and preprocessing a 4288x2848 JPEG takes far longer than a training
step on a patch of it, so every pipeline reads photographs through one
`PreprocessedCache`: each image is decoded and preprocessed once, then kept in
memory or, with a cache directory, as memory-mapped `.npy` files so datasets
larger than RAM stream from disk. Data order and augmentation are drawn from
seeds derived from (seed, epoch), so an epoch is the same whether or not the
run was interrupted and resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from rmib import io
from rmib.data import augment as augment_lib
from rmib.data import fundus
from rmib.errors import BadInputError, RmibError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a photograph is turned into model input; stored in run and export metadata.

    Attributes:
        method: "none", "clahe" (LAB L channel, clip 1.5, 8x8 tiles) or "graham".
        fov_crop: crop to the field of view's bounding box first (classification).
        size: resize with aspect-preserving padding to size x size (classification,
            grading); None keeps full resolution (segmentation).
        centre_crop: IDRiD centre crop (2816 x 3328) before anything else.
    """

    method: str = "clahe"
    fov_crop: bool = False
    size: int | None = None
    centre_crop: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Preprocessing:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def key(self) -> str:
        return f"{self.method}|{self.fov_crop}|{self.size}|{self.centre_crop}"


def preprocess_array(image: np.ndarray, prep: Preprocessing, masks=()):
    """Apply `prep` to a decoded RGB photograph and, geometrically, to its masks.

    Returns:
        (image, masks, fov): the preprocessed uint8 image, the masks transformed
        the same way (nearest neighbour), and the field-of-view mask (uint8 0/1).
    """
    masks = list(masks)
    if prep.centre_crop and _fits_centre_crop(image):
        image = fundus.idrid_centre_crop(image)
        masks = [fundus.idrid_centre_crop(m) for m in masks]
    fov = fundus.fov_mask(image)
    if prep.fov_crop:
        box = fundus.fov_box(image)
        image = fundus.crop_to_box(image, box)
        fov = fundus.crop_to_box(fov, box)
        masks = [fundus.crop_to_box(m, box) for m in masks]
    if prep.size is not None:
        # Resize first: CLAHE and Graham (whose sigma scales with the image) cost
        # 10-15x less on a 480-800 px image than on a 4288x2848 photograph.
        image, _ = fundus.resize_pad(image, prep.size)
        fov, _ = fundus.resize_pad(fov, prep.size, interpolation=_NEAREST)
        masks = [fundus.resize_pad(m, prep.size, interpolation=_NEAREST)[0] for m in masks]
    image = fundus.preprocess(image, prep.method)
    return image, masks, fov


_NEAREST = 0  # cv2.INTER_NEAREST


def _fits_centre_crop(image) -> bool:
    """The IDRiD centre crop applies to photographs at least 2816 x 3328 (smaller ones, e.g.
    other datasets or synthetic images, are used whole)."""
    height, width = fundus.IDRID_CROP_SHAPE
    return image.shape[0] >= height and image.shape[1] >= width


@dataclasses.dataclass
class Example:
    """One preprocessed photograph: image (H, W, 3) uint8, mask (H, W) uint8 or None, fov."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    fov: np.ndarray


def rescale_example(example: Example, scale: float) -> Example:
    """`example` at a working resolution: image, mask and FOV resized by `scale`
    (`rmib.data.fundus.rescale`); `scale == 1` returns `example` itself."""
    if fundus.check_scale(scale) == 1.0:
        return example
    mask = None if example.mask is None else fundus.rescale(example.mask, scale, "mask")
    return Example(
        example.name,
        fundus.rescale(example.image, scale),
        mask,
        fundus.rescale(example.fov, scale, "mask"),
    )


def lesion_mask_path(record, lesion):
    """The record's mask file for `lesion`; None = annotated and absent.

    Raises:
        RmibError: when the dataset does not annotate `lesion` on this image.
    """
    if lesion not in record.masks:
        raise RmibError(
            f"{record.image}: no {lesion} annotation for this image "
            f"(annotated: {', '.join(sorted(record.masks)) or 'none'})"
        )
    return record.masks[lesion]


class PreprocessedCache:
    """Decode + preprocess each photograph once.

    Args:
        directory: where to keep preprocessed arrays as `.npy` (memory-mapped on
            reading, so datasets larger than RAM stream); None keeps them in memory.
            With a directory nothing is held here: every `load` maps the files
            afresh, and the mapping (one open file each) ends with the Example.
    """

    def __init__(self, directory=None):
        self.directory = Path(directory) if directory else None
        self._memory: dict = {}

    def _key(self, record, prep: Preprocessing, lesion):
        path = Path(record.image)
        stat = path.stat() if path.exists() else None
        parts = [str(path.resolve()), prep.key(), str(lesion)]
        if stat is not None:
            parts += [str(stat.st_mtime_ns), str(stat.st_size)]
        mask_path = record.masks.get(lesion) if lesion else None
        if mask_path is not None and Path(mask_path).exists():
            mstat = Path(mask_path).stat()
            parts += [str(mask_path), str(mstat.st_mtime_ns), str(mstat.st_size)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    def load(self, record, prep: Preprocessing, lesion=None) -> Example:
        """The preprocessed example of `record` (with the mask of `lesion` when given)."""
        key = self._key(record, prep, lesion)
        if key in self._memory:
            return self._memory[key]
        if self.directory is not None:
            # The files are the cache: holding their memory maps here would keep
            # two or three files open per photograph (EMFILE past ~500 photographs
            # under the usual 1024-file limit, and the kernel's 65530 maps per
            # process past ~30000).
            folder = self.directory / key
            if not (folder / "image.npy").exists():
                self._write(folder, self._compute(record, prep, lesion))
            return self._read(folder, record.name)
        example = self._compute(record, prep, lesion)
        self._memory[key] = example
        return example

    @staticmethod
    def _compute(record, prep, lesion):
        image = io.read_image(record.image)
        masks = []
        if lesion is not None:
            mask_path = lesion_mask_path(record, lesion)
            if mask_path is None:
                masks = [np.zeros(image.shape[:2], np.uint8)]
            else:
                masks = [io.read_mask(mask_path, expected_shape=image.shape[:2])]
        image, masks, fov = preprocess_array(image, prep, masks)
        return Example(record.name, image, masks[0] if masks else None, fov)

    @staticmethod
    def _write(folder: Path, example: Example):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.save(tmp / "image.npy", example.image)
            np.save(tmp / "fov.npy", example.fov)
            if example.mask is not None:
                np.save(tmp / "mask.npy", example.mask)
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "image.npy").exists():
                raise

    @staticmethod
    def _read(folder: Path, name: str) -> Example:
        mask = folder / "mask.npy"
        return Example(
            name,
            np.load(folder / "image.npy", mmap_mode="r"),
            np.load(mask, mmap_mode="r") if mask.exists() else None,
            np.load(folder / "fov.npy", mmap_mode="r"),
        )


def load_examples(records, prep, lesion=None, cache=None, on_bad="error", problems=None):
    """Preprocess `records` through `cache`; bad files raise or, with on_bad="skip",
    are appended to `problems` as (path, reason) and left out."""
    examples, kept = [], []
    for record, example in _load_each(records, prep, lesion, cache, on_bad, problems):
        examples.append(example)
        kept.append(record)
    return examples, kept


def _load_each(records, prep, lesion=None, cache=None, on_bad="error", problems=None):
    """Yield (record, Example) of the readable `records`, one at a time (as `load_examples`)."""
    cache = cache or PreprocessedCache()
    for record in records:
        try:
            example = cache.load(record, prep, lesion)
        except BadInputError as exc:
            if on_bad != "skip":
                raise
            if problems is not None:
                problems.append((exc.path, exc.reason))
            continue
        yield record, example


def epoch_datasets(start_epoch, epochs, make_epoch):
    """Epochs start_epoch..epochs-1 back to back, each built by make_epoch(epoch)."""
    epochs_ds = tf.data.Dataset.range(start_epoch, max(epochs, start_epoch + 1))
    return epochs_ds.flat_map(make_epoch)


def classification_dataset(
    records,
    size,
    batch_size,
    *,
    preprocessing: Preprocessing | None = None,
    augment="free",
    colour_jitter=0.0,
    shuffle=True,
    seed=0,
    start_epoch=0,
    epochs=1,
    cache=None,
    on_bad="error",
    problems=None,
    drop_remainder=False,
):
    """Batches of (image float32 (size, size, 3) in [0, 255], label float32 (1,)).

    The dataset holds `epochs - start_epoch` epochs back to back, each in its own
    order drawn from (seed, epoch); use it with `steps_per_epoch = steps_for(...)`.
    `augment` and `colour_jitter` are those of `rmib.data.augment.augment_pair`.

    Returns:
        (dataset, steps_per_epoch, records_kept)
    """
    prep = preprocessing or Preprocessing(method="clahe", fov_crop=True, size=size)
    if prep.size != size:
        prep = dataclasses.replace(prep, size=size)
    missing = [r.image for r in records if r.label is None]
    if missing:
        raise RmibError(f"{missing[0]}: no lesion/healthy label for this image")
    cache = cache or PreprocessedCache()
    if cache.directory is None:
        examples, kept = load_examples(records, prep, None, cache, on_bad, problems)

        def image_of(index):
            return examples[index].image

    else:
        # Streaming: every photograph is preprocessed into the cache directory
        # now, and mapped back only while the generator serves it, so neither
        # the pixels nor an open file per photograph stay with the dataset.
        kept = [record for record, _ in _load_each(records, prep, None, cache, on_bad, problems)]

        def image_of(index):
            return cache.load(kept[index], prep).image

    if not kept:
        raise RmibError("no usable images for the classification dataset")
    labels = np.array([[r.label] for r in kept], np.float32)
    n = len(kept)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    steps = max(steps, 1)

    def generate(epoch):
        # Images come one at a time from the cache (memory-mapped with a cache
        # directory), so a dataset larger than RAM streams.
        order = np.random.default_rng([seed, int(epoch)]).permutation(n) if shuffle else range(n)
        for index in order:
            yield index, np.asarray(image_of(index)), labels[index]

    signature = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((size, size, 3), tf.uint8),
        tf.TensorSpec((1,), tf.float32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, image, label):
            image = tf.cast(image, tf.float32)
            if augment != "none" or colour_jitter > 0:
                image, _ = augment_lib.augment_pair(
                    image,
                    tf.zeros_like(image[..., :1]),
                    augment_lib.example_seed(seed, epoch, index),
                    mode=augment,
                    colour_jitter=colour_jitter,
                )
            return image, label

        return ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True).batch(
            batch_size, drop_remainder=drop_remainder
        )

    ds = epoch_datasets(start_epoch, epochs, make_epoch).prefetch(AUTOTUNE)
    return ds, steps, kept


def evaluation_arrays(records, size, preprocessing=None, cache=None, on_bad="error", problems=None):
    """Preprocessed (images uint8 (N, size, size, 3), labels (N,)) for evaluation."""
    prep = preprocessing or Preprocessing(method="clahe", fov_crop=True, size=size)
    examples, kept = load_examples(records, prep, None, cache, on_bad, problems)
    images = np.stack([np.asarray(e.image) for e in examples])
    labels = np.array([r.label for r in kept], np.int64)
    return images, labels, kept


class PatchSampler:
    """Lesion-aware patch sampling over preprocessed full-resolution photographs.

    A fraction `pos_fraction` of patches is centred on a random lesion pixel
    (when the image has any); the rest are centred uniformly inside the field
    of view. Patches near the border are shifted inside the image; images
    smaller than the patch are zero-padded.
    """

    def __init__(self, examples, patch_size, pos_fraction=0.5):
        if not examples:
            raise RmibError("no images to sample patches from")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.examples = examples
        self.patch = int(patch_size)
        self.pos_fraction = pos_fraction
        self._lesion_pixels = []
        self._fov_pixels = []
        for ex in examples:
            mask = np.asarray(ex.mask) if ex.mask is not None else None
            self._lesion_pixels.append(
                np.flatnonzero(mask) if mask is not None else np.empty(0, np.int64)
            )
            fov = np.asarray(ex.fov)[:: self._stride, :: self._stride]
            self._fov_pixels.append((np.flatnonzero(fov), fov.shape[1]))

    _stride = 4  # FOV centres are drawn on a 4-px lattice: 16x less memory, same spread

    def _centre(self, i, rng):
        ex = self.examples[i]
        height, width = ex.image.shape[:2]
        lesion = self._lesion_pixels[i]
        if lesion.size and rng.random() < self.pos_fraction:
            flat = lesion[rng.integers(lesion.size)]
            return divmod(int(flat), width)
        fov, fov_width = self._fov_pixels[i]
        if fov.size:
            flat = fov[rng.integers(fov.size)]
            y, x = divmod(int(flat), fov_width)
            y = min(y * self._stride + int(rng.integers(self._stride)), height - 1)
            x = min(x * self._stride + int(rng.integers(self._stride)), width - 1)
            return y, x
        return int(rng.integers(height)), int(rng.integers(width))

    def sample(self, rng):
        """One (image uint8 (p, p, 3), mask uint8 (p, p)) patch."""
        i = int(rng.integers(len(self.examples)))
        ex = self.examples[i]
        y, x = self._centre(i, rng)
        return self.crop(ex, y - self.patch // 2, x - self.patch // 2)

    def crop(self, ex, top, left):
        p = self.patch
        height, width = ex.image.shape[:2]
        top = int(np.clip(top, 0, max(height - p, 0)))
        left = int(np.clip(left, 0, max(width - p, 0)))
        image = np.asarray(ex.image[top : top + p, left : left + p])
        mask = (
            np.asarray(ex.mask[top : top + p, left : left + p])
            if ex.mask is not None
            else np.zeros(image.shape[:2], np.uint8)
        )
        if image.shape[0] < p or image.shape[1] < p:
            pad = ((0, p - image.shape[0]), (0, p - image.shape[1]))
            image = np.pad(image, pad + ((0, 0),))
            mask = np.pad(mask, pad)
        return image, mask


def patch_dataset(
    examples,
    patch_size,
    batch_size,
    steps_per_epoch,
    *,
    pos_fraction=0.5,
    augment="free",
    colour_jitter=0.0,
    seed=0,
    start_epoch=0,
    epochs=1,
):
    """Batches of (patch float32 (p, p, 3) in [0, 255], mask float32 (p, p, 1)).

    Each epoch holds exactly `steps_per_epoch` batches drawn from (seed, epoch).
    `augment` and `colour_jitter` are those of `rmib.data.augment.augment_pair`.
    """
    sampler = PatchSampler(examples, patch_size, pos_fraction)
    per_epoch = steps_per_epoch * batch_size
    p = int(patch_size)

    def generate(epoch):
        rng = np.random.default_rng([seed, int(epoch)])
        for _ in range(per_epoch):
            yield sampler.sample(rng)

    signature = (
        tf.TensorSpec((p, p, 3), tf.uint8),
        tf.TensorSpec((p, p), tf.uint8),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))
        ds = ds.enumerate()

        def finish(index, pair):
            image, mask = pair
            image = tf.cast(image, tf.float32)
            mask = tf.cast(mask, tf.float32)[..., None]
            image, mask = augment_lib.augment_pair(
                image,
                mask,
                augment_lib.example_seed(seed, epoch, index),
                mode=augment,
                colour_jitter=colour_jitter,
            )
            return image, mask

        return ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True).batch(
            batch_size, drop_remainder=True
        )

    return epoch_datasets(start_epoch, epochs, make_epoch).prefetch(AUTOTUNE)


def whole_images(
    records, lesion=None, preprocessing=None, cache=None, on_bad="error", problems=None
):
    """Yield preprocessed full-resolution `Example`s one at a time (validation, evaluation)."""
    prep = preprocessing or Preprocessing(method="clahe")
    cache = cache or PreprocessedCache()
    for record in records:
        try:
            yield cache.load(record, prep, lesion)
        except BadInputError as exc:
            if on_bad != "skip":
                raise
            if problems is not None:
                problems.append((exc.path, exc.reason))


def stratified_split(records, val_fraction, seed=0, key=lambda r: r.label):
    """Split records into (train, val) with each class in proportion.

    Every class with at least two images keeps one on each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RmibError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    train, val = [], []
    for _, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        order = rng.permutation(len(members))
        n_val = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val


def split_by_names(records, names):
    """Split records into (train, val) with val = the records whose name is in `names`."""
    wanted = {n.strip() for n in names if n.strip()}
    unknown = wanted - {r.name for r in records}
    if unknown:
        raise RmibError(f"--val-names: no image named {', '.join(sorted(unknown))} in the data")
    return [r for r in records if r.name not in wanted], [r for r in records if r.name in wanted]
