import cv2
import numpy as np
import pytest
import tensorflow as tf

from rmib import io
from rmib.data import augment as augment_lib
from rmib.data import pipeline
from rmib.data.records import Record
from rmib.errors import BadInputError, RmibError

pytestmark = pytest.mark.timeout(120)


def _disc_image(size, seed, lesion=True):
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 2 - 2, (180, 80, 40), -1)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        y, x = rng.integers(size // 3, 2 * size // 3, 2)
        cv2.circle(mask, (int(x), int(y)), 3, 1, -1)
        image[mask > 0] = (250, 230, 60)
    return image, mask


def _records(tmp_path, n=6, size=64):
    records = []
    for i in range(n):
        image, mask = _disc_image(size, i, lesion=i % 2 == 0)
        ipath = tmp_path / f"img_{i}.png"
        io.write_image(ipath, image)
        masks = {"EX": None}
        if mask.any():
            mpath = tmp_path / f"img_{i}_EX.png"
            io.write_image(mpath, mask * 255)
            masks["EX"] = mpath
        records.append(Record(ipath, f"img_{i}", grade=i % 2, label=int(i % 2 == 0), masks=masks))
    return records


def test_rot90_augment_keeps_image_and_mask_aligned():
    mask = np.zeros((16, 16, 1), np.float32)
    mask[2:5, 3:9] = 1
    image = np.repeat(mask * 255.0, 3, axis=2)
    seen = set()
    for index in range(12):
        seed = augment_lib.example_seed(3, 0, index)
        out_image, out_mask = augment_lib.augment_pair(
            tf.constant(image), tf.constant(mask), seed, mode="rot90"
        )
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        np.testing.assert_array_equal(out_image[..., 0] > 127, out_mask[..., 0] > 0.5)
        assert out_mask.sum() == mask.sum()
        seen.add(out_mask.tobytes())
    assert len(seen) > 2  # the transformations really vary


def test_free_augment_mask_stays_binary_and_aligned():
    mask = np.zeros((48, 48, 1), np.float32)
    mask[10:30, 14:34] = 1
    image = np.repeat(mask * 255.0, 3, axis=2)
    seed = augment_lib.example_seed(0, 1, 5)
    out_image, out_mask = augment_lib.augment_pair(
        tf.constant(image), tf.constant(mask), seed, mode="free", noise_std=0.0
    )
    out_mask = out_mask.numpy()[..., 0]
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    agree = np.mean((out_image.numpy()[..., 0] > 127) == (out_mask > 0.5))
    assert agree > 0.97
    again = augment_lib.augment_pair(
        tf.constant(image), tf.constant(mask), seed, mode="free", noise_std=0.0
    )[1]
    np.testing.assert_array_equal(out_mask, again.numpy()[..., 0])


def test_rotation_transform_identity_and_quarter_turn():
    identity = augment_lib.rotation_zoom_transform(tf.constant(0.0), tf.constant(1.0), 5, 5)
    np.testing.assert_allclose(identity.numpy(), [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-6)
    image = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    quarter = augment_lib.rotation_zoom_transform(tf.constant(np.pi / 2), tf.constant(1.0), 5, 5)
    import keras

    rotated = keras.ops.image.affine_transform(image, quarter[None], interpolation="nearest")
    expected = np.rot90(image[0, :, :, 0], k=1)
    matches = np.array_equal(rotated[0, :, :, 0], expected)
    matches |= np.array_equal(rotated[0, :, :, 0], np.rot90(image[0, :, :, 0], k=-1))
    assert matches


def test_patch_sampler_centres_on_lesions_when_asked():
    examples = []
    for i in range(3):
        image, mask = _disc_image(96, i)
        examples.append(
            pipeline.Example(f"e{i}", image, mask, (image[..., 0] > 10).astype(np.uint8))
        )
    sampler = pipeline.PatchSampler(examples, 32, pos_fraction=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, mask = sampler.sample(rng)
        assert mask.shape == (32, 32)
        assert mask.any()
    sampler = pipeline.PatchSampler(examples, 32, pos_fraction=0.0)
    hits = sum(sampler.sample(rng)[1].any() for _ in range(60))
    assert hits < 40  # uniform sampling rarely hits a 7-px lesion in a 96-px image


def test_patch_sampler_pads_small_images():
    image, mask = _disc_image(20, 0)
    ex = pipeline.Example("small", image, mask, np.ones((20, 20), np.uint8))
    patch, patch_mask = pipeline.PatchSampler([ex], 32).sample(np.random.default_rng(1))
    assert patch.shape == (32, 32, 3) and patch_mask.shape == (32, 32)
    np.testing.assert_array_equal(patch[:20, :20], image)
    assert not patch[20:].any()


def test_patch_dataset_shapes_determinism_and_epochs(tmp_path):
    records = _records(tmp_path)
    examples, _ = pipeline.load_examples(records, pipeline.Preprocessing(method="none"), "EX")

    def batches(start_epoch):
        ds = pipeline.patch_dataset(
            examples, 32, 4, 2, seed=7, start_epoch=start_epoch, epochs=3, augment="free"
        )
        return [(x.numpy(), y.numpy()) for x, y in ds]

    full = batches(0)
    assert len(full) == 6
    x, y = full[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (4, 32, 32, 1) and set(np.unique(y)) <= {0.0, 1.0}
    assert x.min() >= 0 and x.max() <= 255
    resumed = batches(1)
    assert len(resumed) == 4
    for a, b in zip(full[2:], resumed, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(full[0][0], full[2][0])


def test_classification_dataset(tmp_path):
    records = _records(tmp_path)
    ds, steps, kept = pipeline.classification_dataset(
        records, 48, 4, seed=1, epochs=2, augment="rot90"
    )
    assert steps == 2 and len(kept) == 6
    batches = list(ds)
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (4, 48, 48, 3) and images.dtype == tf.float32
    assert labels.shape == (4, 1)
    epoch0 = np.concatenate([b[1].numpy() for b in batches[:2]])
    assert sorted(epoch0[:, 0]) == sorted(r.label for r in records)
    again, _, _ = pipeline.classification_dataset(records, 48, 4, seed=1, epochs=2, augment="rot90")
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


def test_cache_directory_round_trip(tmp_path):
    (tmp_path / "data").mkdir()
    records = _records(tmp_path / "data", n=2)
    cache = pipeline.PreprocessedCache(tmp_path / "cache")
    prep = pipeline.Preprocessing(method="clahe")
    first = cache.load(records[0], prep, "EX")
    fresh = pipeline.PreprocessedCache(tmp_path / "cache").load(records[0], prep, "EX")
    assert isinstance(fresh.image, np.memmap)
    np.testing.assert_array_equal(first.image, fresh.image)
    np.testing.assert_array_equal(first.mask, fresh.mask)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_bad_mask_size_names_the_file(tmp_path):
    image, _ = _disc_image(32, 0)
    io.write_image(tmp_path / "a.png", image)
    io.write_image(tmp_path / "a_EX.png", np.ones((30, 32), np.uint8) * 255)
    record = Record(tmp_path / "a.png", "a", masks={"EX": tmp_path / "a_EX.png"})
    with pytest.raises(BadInputError, match="a_EX.png.*32x30.*32x32"):
        pipeline.PreprocessedCache().load(record, pipeline.Preprocessing(), "EX")
    problems = []
    examples, kept = pipeline.load_examples(
        [record], pipeline.Preprocessing(), "EX", on_bad="skip", problems=problems
    )
    assert examples == [] and problems[0][0].endswith("a_EX.png")


def test_lesion_not_annotated_is_an_error(tmp_path):
    record = Record(tmp_path / "a.png", "a", masks={"HE": None})
    with pytest.raises(RmibError, match="no EX annotation"):
        pipeline.lesion_mask_path(record, "EX")


def test_stratified_split_keeps_classes():
    records = [Record(f"{i}.png", str(i), label=int(i < 4)) for i in range(10)]
    train, val = pipeline.stratified_split(records, 0.25, seed=0)
    assert len(train) + len(val) == 10
    assert {r.label for r in val} == {0, 1}
    assert sum(r.label for r in val) == 1  # round(0.25 * 4)
    assert not {r.name for r in train} & {r.name for r in val}
    with pytest.raises(RmibError, match="val-fraction"):
        pipeline.stratified_split(records, 1.5)
    train, val = pipeline.split_by_names(records, ["3", "7"])
    assert [r.name for r in val] == ["3", "7"]
    with pytest.raises(RmibError, match="nope"):
        pipeline.split_by_names(records, ["nope"])


def test_colour_jitter_reaches_the_patches_and_the_classifier_images(tmp_path):
    records = _records(tmp_path)
    examples, _ = pipeline.load_examples(records, pipeline.Preprocessing(method="none"), "EX")

    def patches(jitter):
        ds = pipeline.patch_dataset(
            examples, 32, 4, 1, seed=7, augment="rot90", colour_jitter=jitter
        )
        return next(iter(ds))

    (plain, plain_mask), (jittered, jittered_mask) = patches(0.0), patches(0.3)
    np.testing.assert_array_equal(plain_mask.numpy(), jittered_mask.numpy())
    assert np.abs(plain.numpy() - jittered.numpy()).max() > 1.0

    def images(jitter):
        ds, _, _ = pipeline.classification_dataset(
            records, 48, 6, seed=1, augment="none", colour_jitter=jitter
        )
        return next(iter(ds))[0].numpy()

    plain = images(0.0)
    assert np.abs(images(0.3) - plain).max() > 1.0
    np.testing.assert_array_equal(images(0.0), plain)
