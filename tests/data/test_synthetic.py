"""Synthetic fundus photographs and the dataset layouts written from them."""

import csv
import sys

import cv2
import numpy as np
import openpyxl
import pytest

from rmib import LESIONS
from rmib.data import readers, synthetic
from rmib.data.fundus import fov_mask
from rmib.data.synthetic import synthesize_fundus, write_dataset
from rmib.errors import RmibError
from rmib.io import read_image, read_mask

pytestmark = pytest.mark.timeout(180)


def _lesion_kinds(masks):
    return {k for k in LESIONS if masks[k].any()}


# ----------------------------------------------------------------------------- photographs


def test_same_seed_same_photograph_other_seed_other_photograph():
    a_image, a_masks, a_grade = synthesize_fundus(96, seed=5)
    b_image, b_masks, b_grade = synthesize_fundus(96, seed=5)
    np.testing.assert_array_equal(a_image, b_image)
    assert a_grade == b_grade
    for key in synthetic.MASK_KEYS:
        np.testing.assert_array_equal(a_masks[key], b_masks[key])
    c_image, _, _ = synthesize_fundus(96, seed=6)
    assert np.abs(a_image.astype(int) - c_image.astype(int)).mean() > 2


@pytest.mark.parametrize("size, shape", [(64, (64, 64)), ((72, 112), (72, 112)), (200, (200, 200))])
def test_shapes_and_types(size, shape):
    image, masks, grade = synthesize_fundus(size, seed=1, grade=3)
    assert image.shape == shape + (3,) and image.dtype == np.uint8
    assert set(masks) == {"EX", "HE", "MA", "SE", "OD"}
    for mask in masks.values():
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
    assert grade == 3
    assert masks["OD"].sum() > 0


def test_bad_sizes_and_grades_are_refused():
    with pytest.raises(ValueError, match="size"):
        synthesize_fundus(16, seed=0)
    with pytest.raises(ValueError, match="grade"):
        synthesize_fundus(64, seed=0, grade=5)


@pytest.mark.parametrize("size", [64, 160])
def test_lesions_match_the_grade(size):
    for seed in range(6):
        for grade in range(5):
            _, masks, got = synthesize_fundus(size, seed=seed, grade=grade)
            kinds = _lesion_kinds(masks)
            assert got == grade
            if grade == 0:
                assert kinds == set()
            elif grade == 1:
                assert kinds == {"MA"}
            elif grade == 2:
                assert "MA" in kinds and kinds & {"HE", "EX"} and "SE" not in kinds
            else:
                assert {"MA", "HE", "SE"} <= kinds
    grades = {synthesize_fundus(48, seed=s)[2] for s in range(40)}
    assert grades == {0, 1, 2, 3, 4}  # grade=None picks every grade


def test_lesions_lie_inside_the_field_of_view_and_do_not_overlap():
    for seed in range(4):
        image, masks, _ = synthesize_fundus(160, seed=seed, grade=4)
        fov = fov_mask(image).astype(bool)
        total = np.zeros(fov.shape, int)
        for key in synthetic.MASK_KEYS:
            assert not (masks[key].astype(bool) & ~fov).any(), key
            total += masks[key] if key != "OD" else 0
        assert total.max() <= 1
        # Outside the field of view the photograph is black.
        assert image[~fov].max(axis=1).mean() < 8


def _ring(mask, width, exclude):
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    grown = cv2.dilate(mask, kernel).astype(bool)
    return grown & ~cv2.dilate(exclude.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_are_aligned_with_what_is_painted(seed):
    image, masks, _ = synthesize_fundus(256, seed=seed, grade=3)
    pixels = image.astype(float)
    brightness = pixels.sum(axis=2)
    yellowness = pixels[..., 1] - pixels[..., 2]
    any_lesion = np.zeros(image.shape[:2], np.uint8)
    for key in synthetic.MASK_KEYS:
        any_lesion |= masks[key]
    for key in ("MA", "HE", "EX", "SE", "OD"):
        mask = masks[key]
        if not mask.any():
            continue
        ring = _ring(mask, 4, any_lesion)
        inside, around = brightness[mask > 0].mean(), brightness[ring].mean()
        if key in ("MA", "HE"):
            assert inside < 0.8 * around, key  # dark red
            assert pixels[mask > 0][:, 0].mean() > 1.5 * pixels[mask > 0][:, 1].mean(), key
        else:
            assert inside > 1.15 * around, key  # exudates and disc are bright
        if key == "EX":
            assert yellowness[mask > 0].mean() > yellowness[ring].mean() + 40


def _python_calls(size, seed):
    """How many Python and builtin function calls painting one photograph makes."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        synthesize_fundus(size, seed=seed, grade=4)
    finally:
        sys.setprofile(None)
    return calls


def test_a_512_px_photograph_is_painted_with_whole_array_operations():
    # Fast (0.2-0.3 s on one core) because no Python code runs per pixel. Counted, not
    # timed: the calls are far fewer than the 262144 pixels, and four times the pixels
    # (1024 px) add few calls (the lesions' sizes follow the photograph's; their number
    # does not). A per-pixel or per-row Python loop would multiply them.
    for seed in range(2):
        at_512, at_1024 = _python_calls(512, seed), _python_calls(1024, seed)
        assert at_512 < 512 * 512 // 4, at_512
        assert at_1024 < 1.5 * at_512, (at_512, at_1024)


# ----------------------------------------------------------------------------- layouts


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _regenerated(count, size, seed):
    return [sample for _, sample in synthetic.layouts.samples(count, size, seed)]


def test_unknown_layout_and_bad_count_are_user_errors(tmp_path):
    with pytest.raises(RmibError, match=r"'idird'.*idrid, kaggle"):
        write_dataset(tmp_path, "idird", 2, 64)
    with pytest.raises(RmibError, match="count"):
        write_dataset(tmp_path, "kaggle", 0, 64)


def test_idrid_layout(tmp_path):
    root = write_dataset(tmp_path / "idrid", "idrid", 10, 64, seed=3)
    samples = _regenerated(10, 64, 3)
    seg = root / "A. Segmentation"
    train = seg / "1. Original Images" / "a. Training Set"
    test = seg / "1. Original Images" / "b. Testing Set"
    assert sorted(p.name for p in train.iterdir()) == [f"IDRiD_{i:02d}.jpg" for i in range(1, 8)]
    assert sorted(p.name for p in test.iterdir()) == [f"IDRiD_{i:02d}.jpg" for i in range(8, 11)]
    truths = seg / "2. All Segmentation Groundtruths"
    folders = {
        "MA": "1. Microaneurysms",
        "HE": "2. Haemorrhages",
        "EX": "3. Hard Exudates",
        "SE": "4. Soft Exudates",
        "OD": "5. Optic Disc",
    }
    for i, sample in enumerate(samples):
        split = "a. Training Set" if i < 7 else "b. Testing Set"
        for code, folder in folders.items():
            path = truths / split / folder / f"IDRiD_{i + 1:02d}_{code}.tif"
            assert path.is_file() == bool(sample["masks"][code].any()), path
            if path.is_file():
                rgb = read_image(path)
                assert set(map(tuple, np.unique(rgb.reshape(-1, 3), axis=0))) <= {
                    (0, 0, 0),
                    (255, 0, 0),
                }
                np.testing.assert_array_equal(read_mask(path), sample["masks"][code])
    grading = root / "B. Disease Grading"
    table = grading / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv"
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Image name", "Retinopathy grade", "Risk of macular edema "]
    assert [r["Image name"] for r in rows] == [f"IDRiD_{i:03d}" for i in range(1, 8)]
    assert [int(r["Retinopathy grade"]) for r in rows] == [s["grade"] for s in samples[:7]]
    for row, sample in zip(rows, samples[:7], strict=True):
        assert (int(row["Risk of macular edema "]) > 0) == bool(sample["masks"]["EX"].any())
    test_table = grading / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv"
    assert test_table.is_file()
    test_images = grading / "1. Original Images" / "b. Testing Set"
    assert sorted(p.name for p in test_images.iterdir()) == [
        "IDRiD_001.jpg",
        "IDRiD_002.jpg",
        "IDRiD_003.jpg",
    ]
    # Same photographs in both parts (JPEG is deterministic).
    a = (test / "IDRiD_08.jpg").read_bytes()
    assert a == (test_images / "IDRiD_001.jpg").read_bytes()


def test_kaggle_layout(tmp_path):
    root = write_dataset(tmp_path / "k", "kaggle", 5, 64, seed=1)
    names = ["10_left", "10_right", "11_left", "11_right", "12_left"]
    assert _files(root) == sorted(["trainLabels.csv"] + [f"train/{n}.jpeg" for n in names])
    with open(root / "trainLabels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "level"]
    assert sorted(int(r[1]) for r in rows[1:]) == [0, 1, 2, 3, 4]  # balanced grades
    assert read_image(root / "train" / "10_left.jpeg").shape == (64, 64, 3)


def test_aptos_layout(tmp_path):
    root = write_dataset(tmp_path / "a", "aptos", 3, 48, seed=1)
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["id_code", "diagnosis"]]
    for row in rows:
        assert len(row["id_code"]) == 12
        assert (root / "train_images" / f"{row['id_code']}.png").is_file()


def test_messidor_layout_writes_a_real_excel_file(tmp_path):
    root = write_dataset(tmp_path / "m", "messidor", 10, 48, seed=2)
    samples = _regenerated(10, 48, 2)
    book = openpyxl.load_workbook(root / "Base11" / "Annotation_Base11.xlsx")
    rows = list(book.active.values)
    assert rows[0][:3] == ("Image name", "Ophthalmologic department", "Retinopathy grade")
    grades = [row[2] for row in rows[1:]]
    assert grades == [min(s["grade"], 3) for s in samples]  # Messidor grades 0-3
    assert max(grades) == 3 and grades.count(3) == 4
    for row in rows[1:]:
        assert (root / "Base11" / row[0]).is_file() and row[0].endswith(".tif")


def test_ddr_layout(tmp_path):
    root = write_dataset(tmp_path / "d", "ddr", 10, 48, seed=4)
    samples = _regenerated(10, 48, 4)
    seg = root / "lesion_segmentation"
    names = {
        s: sorted(p.stem for p in (seg / s / "image").iterdir()) for s in ("train", "valid", "test")
    }
    assert [len(names[s]) for s in ("train", "valid", "test")] == [6, 2, 2]
    for split, stems in names.items():
        for stem in stems:
            for code in LESIONS:
                assert (seg / split / "label" / code / f"{stem}.tif").is_file()
            assert (root / "DR_grading" / split / f"{stem}.jpg").is_file()
    lines = (root / "DR_grading" / "train.txt").read_text().split("\n")
    first_name, first_grade = lines[0].split()
    assert first_name == f"{names['train'][0]}.jpg" and int(first_grade) == samples[0]["grade"]
    mask = read_mask(seg / "train" / "label" / "MA" / f"{names['train'][0]}.tif")
    np.testing.assert_array_equal(mask, samples[0]["masks"]["MA"])


def test_eophtha_layout(tmp_path):
    root = write_dataset(tmp_path / "e", "e-ophtha", 10, 48, seed=5)
    samples = _regenerated(10, 48, 5)
    for i, sample in enumerate(samples):
        patient, name = f"E{i // 2:07d}", f"C{i:07d}"
        for code in ("EX", "MA"):
            tree = root / f"e_optha_{code}"
            has = bool(sample["masks"][code].any())
            assert (tree / code / patient / f"{name}.jpg").is_file() == has
            annotation = tree / f"Annotation_{code}" / patient / f"{name}_{code}.png"
            assert annotation.is_file() == has
        if sample["grade"] == 0:
            healthy = [
                root / f"e_optha_{c}" / "healthy" / patient / f"{name}.jpg" for c in ("EX", "MA")
            ]
            assert sum(p.is_file() for p in healthy) == 1


def test_folder_layouts(tmp_path):
    root = write_dataset(tmp_path / "f", "folder", 5, 48, seed=6)
    samples = _regenerated(5, 48, 6)
    assert sorted(p.name for p in (root / "images").iterdir()) == [
        f"fundus_{i:04d}.jpg" for i in range(5)
    ]
    assert sorted(p.name for p in (root / "masks").iterdir()) == sorted(synthetic.MASK_KEYS)
    for i, sample in enumerate(samples):
        for code in synthetic.MASK_KEYS:
            path = root / "masks" / code / f"fundus_{i:04d}.png"
            assert path.is_file() == bool(sample["masks"][code].any())
    root = write_dataset(tmp_path / "c", "folder-classes", 5, 48, seed=6)
    assert len(list((root / "healthy").iterdir())) == 1  # one grade-0 photograph in five
    assert len(list((root / "lesion").iterdir())) == 4


# ----------------------------------------------------------------------------- round trip


def _eophtha_count(samples):
    return sum(
        bool(s["masks"]["EX"].any()) + bool(s["masks"]["MA"].any()) + (s["grade"] == 0)
        for s in samples
    )


@pytest.mark.parametrize(
    "layout, read_as, graded",
    [
        ("idrid", "idrid", True),
        ("kaggle", "kaggle", True),
        ("aptos", "aptos", True),
        ("messidor", "messidor", True),
        ("ddr", "ddr", True),
        ("e-ophtha", "e-ophtha", False),
        ("folder", "folder-masks", False),
        ("folder-classes", "folder-classes", False),
    ],
)
def test_round_trip_through_read_dataset(tmp_path, layout, read_as, graded):
    root = write_dataset(tmp_path / layout, layout, 10, 48, seed=7)
    samples = _regenerated(10, 48, 7)
    assert readers.detect_layout(root) == read_as
    dataset = readers.read_dataset(root)
    assert dataset.layout == read_as
    expected = {"idrid": 20, "ddr": 20, "e-ophtha": _eophtha_count(samples)}.get(layout, 10)
    assert len(dataset) == expected
    assert dataset.graded == graded
    if layout in ("kaggle", "aptos", "messidor"):
        grades = sorted(min(s["grade"], 3 if layout == "messidor" else 4) for s in samples)
        assert sorted(r.grade for r in dataset.records) == grades
    for record in dataset.records:
        assert record.image.is_file()
        if record.grade is not None:
            assert record.label == int(record.grade > 0)
    if layout in ("idrid", "folder"):
        # Missing file = absent lesion: every mask read back equals the painted one.
        for record in dataset.records:
            if not record.masks:
                continue
            number = int(record.name.split("_")[-1]) - (1 if layout == "idrid" else 0)
            sample = samples[number]
            assert record.label == int(bool(_lesion_kinds(sample["masks"])))
            for code, path in record.masks.items():
                truth = sample["masks"][code]
                got = np.zeros_like(truth) if path is None else read_mask(path, truth.shape)
                np.testing.assert_array_equal(got, truth, err_msg=f"{record.name} {code}")
