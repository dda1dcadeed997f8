"""Datasets larger than RAM stream through the data pipeline.

With a cache directory (`--cache-dir`), every photograph is decoded and
preprocessed once into `.npy` files that are memory-mapped on reading: the
pipeline then holds file-backed pages the kernel can drop, not the dataset.
Here 200 photographs go through `classification_dataset` and one epoch is
read to the end; the memory the pipeline allocates (NumPy, seen by
tracemalloc) and the process's anonymous resident memory (RssAnon: NumPy,
TensorFlow's buffers, everything but file-backed pages) must stay below a
limit of a quarter of the dataset's decoded size, and no file may stay open
per photograph, while every image is served with its exact pixels. Without a cache directory the same pipeline keeps
every decoded image in memory, which the same measurement sees.
"""

from __future__ import annotations

import csv
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)

COUNT = 200  # photographs
SOURCE_SIDE = 256  # the JPEGs on disk
SIZE = 192  # the classification input: 192 x 192 x 3 uint8 = 108 kB per photograph
BATCH = 4
DECODED = COUNT * SIZE * SIZE * 3  # bytes of the preprocessed images the pipeline serves
LIMIT = DECODED // 4  # the memory the pipeline may use while streaming them


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _anonymous_rss() -> int:
    """This process's resident anonymous memory in bytes (not file-backed pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("/proc/self/status has no RssAnon (not Linux)")


@pytest.fixture(scope="module")
def kaggle_tree(tmp_path_factory) -> Path:
    """A Kaggle-layout tree of COUNT distinct fundus-like JPEGs, graded 0 or 2."""
    import cv2

    root = tmp_path_factory.mktemp("kaggle200")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    side = SOURCE_SIDE
    for i in range(COUNT):
        image = np.zeros((side, side, 3), np.uint8)
        colour = tuple(int(c) for c in rng.integers(60, 200, 3))
        cv2.circle(image, (side // 2, side // 2), int(side * 0.45), colour, -1)
        image = cv2.add(image, rng.integers(0, 40, image.shape, dtype=np.uint8))
        assert cv2.imwrite(str(root / "train" / f"{i}_left.jpeg"), image)
        rows.append((f"{i}_left", 2 * (i % 2)))
    with open(root / "trainLabels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "level"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def records(kaggle_tree):
    from rmib.data import readers

    found = readers.read_dataset(kaggle_tree).records
    assert len(found) == COUNT
    return found


@pytest.fixture(scope="module", autouse=True)
def warm_pipeline(records, tmp_path_factory):
    """Run the pipeline once on a few images: TensorFlow's one-off set-up is not the data's."""
    from rmib.data.pipeline import PreprocessedCache, classification_dataset

    cache = PreprocessedCache(tmp_path_factory.mktemp("warm-cache"))
    for cached in (cache, None):
        dataset, _, _ = classification_dataset(
            records[:8], SIZE, BATCH, cache=cached, augment="none"
        )
        for _ in dataset:
            pass


def test_a_cache_directory_streams_a_dataset_larger_than_the_limit(records, tmp_path):
    from rmib.data.pipeline import PreprocessedCache, classification_dataset

    cache_dir = tmp_path / "cache"
    files_before = _open_files()
    before = _anonymous_rss()
    tracemalloc.start()
    try:
        dataset, steps, kept = classification_dataset(
            records, SIZE, BATCH, cache=PreprocessedCache(cache_dir), augment="none"
        )
        held_after_preprocessing = tracemalloc.get_traced_memory()[0]
        preprocessing_growth = _anonymous_rss() - before
        files_peak = _open_files()
        served, positives, pixel_sum = 0, 0, 0.0
        rss = []  # anonymous memory after each batch
        for images, labels in dataset:
            served += int(images.shape[0])
            positives += int(labels.numpy().sum())
            pixel_sum += float(np.sum(images.numpy(), dtype=np.float64))
            rss.append(_anonymous_rss())
            files_peak = max(files_peak, _open_files())
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (len(kept), steps, served, positives) == (COUNT, COUNT // BATCH, COUNT, COUNT // 2)
    # Every image was served with its exact pixels, read from the memory-mapped cache.
    files = sorted(cache_dir.glob("*/image.npy"))
    assert len(files) == COUNT
    expected = sum(float(np.load(f, mmap_mode="r").sum(dtype=np.float64)) for f in files)
    assert pixel_sum == expected  # integers, exact in float64
    mb = 2**20
    # NumPy: what the pipeline holds once every photograph is preprocessed (the
    # records it keeps), and the most it ever held while preprocessing and serving.
    assert held_after_preprocessing < LIMIT / 10, f"{held_after_preprocessing / mb:.1f} MB"
    assert traced_peak < LIMIT, f"NumPy peak {traced_peak / mb:.1f} MB"
    # All anonymous memory: preprocessing the 200 photographs kept none of them,
    # and serving them accumulated none (what tf.data's batch and prefetch
    # buffers take is there after the first batches; the rest of the epoch adds
    # nothing per photograph).
    assert preprocessing_growth < LIMIT, f"{preprocessing_growth / mb:.1f} MB"
    warm = COUNT // BATCH // 5
    serving_growth = max(rss[warm:]) - rss[warm - 1]
    assert serving_growth < LIMIT, f"{serving_growth / mb:.1f} MB"
    # No file stays open per photograph (a memory map holds one): the limit on
    # open files (often 1024) does not bound the dataset.
    assert files_peak - files_before < 16, files_peak - files_before


def test_without_a_cache_directory_the_dataset_is_held_in_memory(records):
    """The contrast that shows the measurement sees a dataset held in memory."""
    from rmib.data.pipeline import classification_dataset

    subset = records[: COUNT // 4]
    tracemalloc.start()
    try:
        dataset = classification_dataset(subset, SIZE, BATCH, augment="none")  # in memory
        held = tracemalloc.get_traced_memory()[0]
        del dataset
    finally:
        tracemalloc.stop()
    assert held >= len(subset) * SIZE * SIZE * 3  # every image (and its FOV mask)
