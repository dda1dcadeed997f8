"""Dataset readers on tiny hand-built trees of every layout, and on the real samples."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pytest

from rmib import io
from rmib.data.readers import check_dataset, detect_layout, read_dataset, summarize_dataset
from rmib.errors import BadInputError, RmibError

pytestmark = pytest.mark.timeout(120)

# ../shared/data beside the project root (the folder holding pyproject.toml).
PROJECT_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
IDRID_LESION_FOLDERS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}
SPLIT_FOLDERS = {"train": "a. Training Set", "test": "b. Testing Set"}


# ----------------------------------------------------------------------------
# Tree builders


def write_image(path, size=(32, 24)):
    """A small RGB image of `size` = (width, height)."""
    width, height = size
    rng = np.random.default_rng(len(str(path)))
    io.write_image(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return Path(path)


def write_mask(path, size=(32, 24)):
    width, height = size
    mask = np.zeros((height, width, 3), np.uint8)
    mask[2:6, 3:9, 0] = 255  # IDRiD style: lesion in red
    io.write_image(path, mask)
    return Path(path)


def write_csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_xlsx(path, rows):
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def _biff_record(opcode, data=b""):
    return struct.pack("<HH", opcode, len(data)) + data


def write_xls(path, rows):
    """A genuine legacy Excel 97-2003 workbook (BIFF8 inside an OLE2 container).

    No writer for .xls is installed, so the two formats are laid down by hand:
    a globals substream naming one sheet, then the sheet's LABEL/NUMBER cells.
    """
    cells = b""
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if isinstance(value, (int, float)):
                cells += _biff_record(0x0203, struct.pack("<HHHd", r, c, 0, float(value)))
            else:
                text = str(value).encode("latin-1")
                cells += _biff_record(0x0204, struct.pack("<HHHHB", r, c, 0, len(text), 0) + text)

    def bof(kind):
        return _biff_record(0x0809, struct.pack("<HHHHII", 0x0600, kind, 0, 1997, 0, 0x0600))

    eof = _biff_record(0x000A)
    name = b"Sheet1"
    sheet_offset = len(bof(5)) + len(_biff_record(0x0085, bytes(8) + name)) + len(eof)
    sheet = _biff_record(0x0085, struct.pack("<IBBBB", sheet_offset, 0, 0, len(name), 0) + name)
    stream = bof(0x0005) + sheet + eof + bof(0x0010) + cells + eof
    # Streams under 4096 bytes would live in the OLE mini-stream; padding keeps
    # this one in ordinary 512-byte sectors, the simplest part of the format.
    size = max(4096, -(-len(stream) // 512) * 512)
    assert size <= 126 * 512, "one FAT sector only"
    stream = stream.ljust(size, b"\0")
    sectors = size // 512
    free, end = 0xFFFFFFFF, 0xFFFFFFFE
    fat = [0xFFFFFFFD] + list(range(2, sectors + 1)) + [end, end]  # FAT, stream, directory
    fat += [free] * (128 - len(fat))

    def entry(entry_name, kind, child, start, length):
        encoded = (entry_name + "\0").encode("utf-16-le") if entry_name else b""
        return (
            encoded.ljust(64, b"\0")
            + struct.pack("<HBBIII", len(encoded), kind, 1, free, free, child)
            + bytes(36)
            + struct.pack("<IIH", start, length, 0).ljust(12, b"\0")
        )

    directory = (
        entry("Root Entry", 5, 1, end, 0)
        + entry("Workbook", 2, free, 1, size)
        + entry("", 0, free, free, 0) * 2
    )
    header = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + bytes(16)
        + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6)
        + bytes(6)
        + struct.pack("<10I", 0, 1, 1 + sectors, 0, 4096, end, 0, end, 0, 0)
        + struct.pack("<I", free) * 108
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + struct.pack("<128I", *fat) + stream + directory)
    return path


def kaggle_tree(root, grades, unlabelled=(), header="image,level"):
    for name in [*grades, *unlabelled]:
        write_image(root / "train" / f"{name}.jpeg")
    lines = [header] + [f"{name},{grade}" for name, grade in grades.items()]
    write_csv(root / "trainLabels.csv", "\n".join(lines) + "\n")
    return root


def idrid_tree(root, segmentation=None, grading=None, size=(32, 24)):
    """segmentation: {split: {image name: [lesion codes with a mask]}};
    grading: {split: {image name: grade}}."""
    seg = root / "A. Segmentation"
    for split, images in (segmentation or {}).items():
        for name, codes in images.items():
            write_image(seg / "1. Original Images" / SPLIT_FOLDERS[split] / f"{name}.jpg", size)
            truths = seg / "2. All Segmentation Groundtruths" / SPLIT_FOLDERS[split]
            for code, folder in IDRID_LESION_FOLDERS.items():
                (truths / folder).mkdir(parents=True, exist_ok=True)
                if code in codes:
                    write_mask(truths / folder / f"{name}_{code}.tif", size)
    grade_part = root / "B. Disease Grading"
    for split, images in (grading or {}).items():
        letter, word = ("a", "Training") if split == "train" else ("b", "Testing")
        for name in images:
            write_image(grade_part / "1. Original Images" / SPLIT_FOLDERS[split] / f"{name}.jpg")
        # As in the real files: a trailing space in a header, trailing empty columns.
        lines = ["Image name,Retinopathy grade,Risk of macular edema ,,"]
        lines += [f"{name},{grade},0,," for name, grade in images.items()]
        lines += [",,,,", ""]
        table = (
            grade_part / "2. Groundtruths" / f"{letter}. IDRiD_Disease Grading_{word} Labels.csv"
        )
        write_csv(table, "\n".join(lines))
    return root


def ddr_tree(root, segmentation=None, grading=None):
    for split, images in (segmentation or {}).items():
        for name, codes in images.items():
            write_image(root / "lesion_segmentation" / split / "image" / f"{name}.jpg")
            for code in ("EX", "HE", "MA", "SE"):
                label_dir = root / "lesion_segmentation" / split / "label" / code
                label_dir.mkdir(parents=True, exist_ok=True)
                if code in codes:
                    write_mask(label_dir / f"{name}.tif")
    for split, images in (grading or {}).items():
        for name in images:
            write_image(root / "DR_grading" / split / f"{name}.jpg")
        lines = [f"{name}.jpg {grade}" for name, grade in images.items()]
        write_csv(root / "DR_grading" / f"{split}.txt", "\n".join(lines) + "\n")
    return root


def eophtha_tree(root, code, lesion_images, healthy_images):
    """lesion_images / healthy_images: {patient: [image stems]}."""
    base = root / f"e_optha_{code}"
    for patient, names in lesion_images.items():
        for name in names:
            write_image(base / code / patient / f"{name}.jpg")
            write_mask(base / f"Annotation_{code}" / patient / f"{name}_{code}.png")
    for patient, names in healthy_images.items():
        for name in names:
            write_image(base / "healthy" / patient / f"{name}.jpg")
    return root


def messages(problems):
    return "\n".join(f"{path}: {reason}" for path, reason in problems)


# ----------------------------------------------------------------------------
# Kaggle and APTOS


def test_kaggle_reads_grades_and_labels(tmp_path):
    kaggle_tree(tmp_path, {"10_left": 0, "10_right": 2, "13_left": 4})
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "kaggle"
    assert dataset.root == tmp_path
    by_name = {r.name: r for r in dataset.records}
    assert set(by_name) == {"10_left", "10_right", "13_left"}
    assert [by_name[n].grade for n in ("10_left", "10_right", "13_left")] == [0, 2, 4]
    assert [by_name[n].label for n in ("10_left", "10_right", "13_left")] == [0, 1, 1]
    assert by_name["10_right"].image == tmp_path / "train" / "10_right.jpeg"
    assert by_name["10_right"].masks == {} and by_name["10_right"].split is None
    assert dataset.lesions == () and dataset.problems == [] and dataset.graded


def test_headers_match_despite_case_and_spaces(tmp_path):
    kaggle_tree(tmp_path, {"a": 1, "b": 0}, header=" Image , LEVEL ")
    assert sorted(r.grade for r in read_dataset(tmp_path).records) == [0, 1]


def test_aptos_reads_png_images(tmp_path):
    for name in ("000c1434d8d7", "001639a390f0"):
        write_image(tmp_path / "train_images" / f"{name}.png")
    write_csv(tmp_path / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,0\n")
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "aptos" and detect_layout(tmp_path) == "aptos"
    assert {r.name: (r.grade, r.label) for r in dataset.records} == {
        "000c1434d8d7": (2, 1),
        "001639a390f0": (0, 0),
    }


# ----------------------------------------------------------------------------
# Bad label tables (the CSV layouts share one code path; each case once)


@pytest.mark.parametrize(
    "grades, unlabelled, where, expected",
    [
        ({"a": 0, "ghost": 1}, (), "trainLabels.csv", "image 'ghost' not found in"),
        ({"a": 0}, ("stray",), "stray.jpeg", "image without a label"),
        ({"a": 0, "b": "two"}, (), "trainLabels.csv", "grade 'two' for 'b' is not a number"),
        ({"a": 0, "b": 1.5}, (), "trainLabels.csv", "grade '1.5' for 'b' is not a whole"),
        ({"a": 0, "b": 7}, (), "trainLabels.csv", "grade 7 for 'b' is out of range; expected"),
        ({"a": 0, "b": -1}, (), "trainLabels.csv", "grade -1 for 'b' is out of range"),
        ({"a": 0, "b": ""}, (), "trainLabels.csv", "no grade for 'b'"),
    ],
)
def test_bad_labels_raise_naming_the_file_or_skip(tmp_path, grades, unlabelled, where, expected):
    written = {n: g for n, g in grades.items() if n != "ghost"}
    kaggle_tree(tmp_path, written, unlabelled)
    if "ghost" in grades:
        with open(tmp_path / "trainLabels.csv", "a") as f:
            f.write("ghost,1\n")
    with pytest.raises(BadInputError) as caught:
        read_dataset(tmp_path)
    assert Path(caught.value.path).name == where
    assert expected in str(caught.value) and where in str(caught.value)

    dataset = read_dataset(tmp_path, on_bad="skip")
    assert [r.name for r in dataset.records] == ["a"]
    assert len(dataset.problems) == 1
    path, reason = dataset.problems[0]
    assert Path(path).name == where and expected in reason


def test_row_numbers_in_messages_are_file_lines(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 1, "c": "x"})
    with pytest.raises(BadInputError, match=r"row 4: grade 'x'"):
        read_dataset(tmp_path)


def test_missing_columns_name_the_file_and_the_expected_columns(tmp_path):
    kaggle_tree(tmp_path, {"a": 0}, header="image,grade")
    with pytest.raises(BadInputError) as caught:
        read_dataset(tmp_path)
    message = str(caught.value)
    assert "trainLabels.csv" in message
    assert "missing column(s) 'level'" in message
    assert "columns 'image' and 'level'" in message and "found 'image', 'grade'" in message
    # Nothing usable is left, so even "skip" stops, with the reason.
    with pytest.raises(RmibError, match="no usable images.*missing column"):
        read_dataset(tmp_path, on_bad="skip")
    dataset = read_dataset(tmp_path, on_bad="skip", allow_empty=True)
    assert dataset.records == [] and "missing column" in dataset.problems[0][1]


def test_conflicting_duplicate_rows_are_bad_identical_ones_are_not(tmp_path):
    kaggle_tree(tmp_path, {"a": 1, "b": 0})
    with open(tmp_path / "trainLabels.csv", "a") as f:
        f.write("a,1\n")
    assert len(read_dataset(tmp_path)) == 2
    with open(tmp_path / "trainLabels.csv", "a") as f:
        f.write("b,3\n")
    with pytest.raises(BadInputError, match="'b' has grade 3 here but 0 in row 3"):
        read_dataset(tmp_path)
    dataset = read_dataset(tmp_path, on_bad="skip")
    assert [r.name for r in dataset.records] == ["a"]


def test_readers_only_list_files(tmp_path):
    kaggle_tree(tmp_path, {"a": 0, "b": 1})
    broken = tmp_path / "train" / "b.jpeg"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated: decoding would fail
    assert len(read_dataset(tmp_path)) == 2


# ----------------------------------------------------------------------------
# Messidor


MESSIDOR_HEADER = [
    "Image name",
    "Ophthalmologic department",
    "Retinopathy grade",
    "Risk of macular edema ",
]


def test_messidor_xls_xlsx_and_csv_in_nested_bases(tmp_path):
    base11 = tmp_path / "Messidor" / "Base11"
    base12 = tmp_path / "Messidor" / "Base12"
    base13 = tmp_path / "Messidor" / "Base13"
    for folder, names in ((base11, "abc"), (base12, "de"), (base13, "f")):
        for n in names:
            write_image(folder / f"20051019_{n}_PP.tif")
    write_xls(
        base11 / "Annotation_Base11.xls",
        [MESSIDOR_HEADER]
        + [
            [f"20051019_{n}_PP.tif", "Service Ophtalmologie Lariboisiere", g, 0]
            for n, g in zip("abc", (0, 3, 1), strict=True)
        ],
    )
    write_xlsx(
        base12 / "Annotation_Base12.xlsx",
        [[" image NAME", "Retinopathy  grade "], ["20051019_d_PP.tif", 2], ["20051019_e_PP", 0]],
    )
    write_csv(
        base13 / "Annotation_Base13.csv", "Image name;Retinopathy grade\n20051019_f_PP.tif;1\n"
    )
    assert detect_layout(tmp_path) == "messidor"
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "messidor"
    grades = {r.name: r.grade for r in dataset.records}
    assert grades == {
        "20051019_a_PP": 0,
        "20051019_b_PP": 3,
        "20051019_c_PP": 1,
        "20051019_d_PP": 2,
        "20051019_e_PP": 0,
        "20051019_f_PP": 1,
    }
    assert all(isinstance(g, int) for g in grades.values())  # 3.0 in the .xls -> 3
    assert {r.name: r.label for r in dataset.records}["20051019_b_PP"] == 1
    assert next(r for r in dataset.records if r.name == "20051019_d_PP").image.parent == base12


def test_messidor_grade_4_is_out_of_range(tmp_path):
    write_image(tmp_path / "x.tif")
    write_xlsx(tmp_path / "Annotation_Base21.xlsx", [MESSIDOR_HEADER, ["x.tif", "", 4, 0]])
    with pytest.raises(BadInputError, match="Annotation_Base21.xlsx: row 2: grade 4 .*0-3"):
        read_dataset(tmp_path)


def test_xls_that_is_no_spreadsheet_is_a_clear_error(tmp_path):
    write_image(tmp_path / "x.tif")
    write_csv(tmp_path / "Annotation_Base11.xls", "<html>not a workbook</html>")
    with pytest.raises(BadInputError) as caught:
        read_dataset(tmp_path, layout="messidor")
    message = str(caught.value)
    assert "Annotation_Base11.xls" in message and "not an Excel workbook" in message
    assert "'Image name' and 'Retinopathy grade'" in message
    dataset = read_dataset(tmp_path, on_bad="skip", allow_empty=True)
    # The broken table is reported once; its images are not each listed as unlabelled.
    assert len(dataset.problems) == 1 and "not an Excel workbook" in dataset.problems[0][1]


def test_corrupt_xls_with_ole_magic_is_a_clear_error(tmp_path):
    write_image(tmp_path / "x.tif")
    path = write_xls(tmp_path / "Annotation_Base11.xls", [MESSIDOR_HEADER, ["x.tif", "", 0, 0]])
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(BadInputError, match=r"Annotation_Base11.xls: not a readable .xls"):
        read_dataset(tmp_path)


def test_xls_holding_an_xlsx_workbook_is_read(tmp_path):
    write_image(tmp_path / "x.tif")
    write_xlsx(tmp_path / "book.xlsx", [MESSIDOR_HEADER, ["x.tif", "", 2, 0]])
    (tmp_path / "book.xlsx").rename(tmp_path / "Annotation_Base11.xls")
    assert [r.grade for r in read_dataset(tmp_path).records] == [2]


# ----------------------------------------------------------------------------
# IDRiD


def test_idrid_segmentation_and_grading_in_one_tree(tmp_path):
    idrid_tree(
        tmp_path,
        segmentation={
            "train": {"IDRiD_01": ["MA", "HE", "EX", "OD"], "IDRiD_02": ["MA", "SE", "OD"]},
            "test": {"IDRiD_55": ["OD"]},
        },
        grading={"train": {"IDRiD_001": 3, "IDRiD_002": 0}, "test": {"IDRiD_101": 4}},
    )
    assert detect_layout(tmp_path) == "idrid"
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "idrid"
    assert dataset.lesions == ("EX", "HE", "MA", "SE", "OD")
    by_name = {r.name: r for r in dataset.records}
    assert len(by_name) == 6

    first = by_name["IDRiD_01"]
    truths = tmp_path / "A. Segmentation" / "2. All Segmentation Groundtruths" / "a. Training Set"
    assert first.masks == {
        "EX": truths / "3. Hard Exudates" / "IDRiD_01_EX.tif",
        "HE": truths / "2. Haemorrhages" / "IDRiD_01_HE.tif",
        "MA": truths / "1. Microaneurysms" / "IDRiD_01_MA.tif",
        "SE": None,
        "OD": truths / "5. Optic Disc" / "IDRiD_01_OD.tif",
    }
    assert (first.split, first.grade, first.label) == ("train", None, 1)
    assert by_name["IDRiD_02"].masks["EX"] is None and by_name["IDRiD_02"].masks["SE"] is not None
    # An optic disc is no lesion: an image with only OD is labelled healthy.
    assert (by_name["IDRiD_55"].split, by_name["IDRiD_55"].label) == ("test", 0)

    graded = {
        r.name: (r.grade, r.label, r.split, r.masks) for r in dataset.records if r.grade is not None
    }
    assert graded == {
        "IDRiD_001": (3, 1, "train", {}),
        "IDRiD_002": (0, 0, "train", {}),
        "IDRiD_101": (4, 1, "test", {}),
    }
    assert len(dataset.with_lesion("SE")) == 3


def test_idrid_parts_can_be_read_alone(tmp_path):
    idrid_tree(
        tmp_path,
        segmentation={"train": {"IDRiD_01": ["EX"]}},
        grading={"train": {"IDRiD_001": 2}},
    )
    grading = read_dataset(tmp_path, layout="idrid-grading")
    assert grading.layout == "idrid-grading" and [r.name for r in grading.records] == ["IDRiD_001"]
    segmentation = read_dataset(tmp_path, layout="IDRiD-Segmentation")
    assert [r.name for r in segmentation.records] == ["IDRiD_01"]

    only_a = idrid_tree(tmp_path / "a", segmentation={"train": {"IDRiD_01": ["EX"]}})
    assert detect_layout(only_a) == "idrid-segmentation"
    with pytest.raises(RmibError, match="not in the idrid-grading layout; expected B. Disease"):
        read_dataset(only_a, layout="idrid-grading")


def test_idrid_missing_lesion_folder_means_absent(tmp_path):
    idrid_tree(tmp_path, segmentation={"train": {"IDRiD_01": ["EX"]}})
    se = (
        tmp_path
        / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/4. Soft Exudates"
    )
    se.rmdir()
    (record,) = read_dataset(tmp_path).records
    assert record.masks["SE"] is None and record.masks["EX"] is not None


def test_idrid_mask_without_image(tmp_path):
    idrid_tree(tmp_path, segmentation={"train": {"IDRiD_01": ["EX"]}})
    truths = tmp_path / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"
    orphan = write_mask(truths / "3. Hard Exudates" / "IDRiD_09_EX.tif")
    with pytest.raises(BadInputError) as caught:
        read_dataset(tmp_path)
    assert caught.value.path == str(orphan)
    assert "mask without an image: expected IDRiD_09.* in" in caught.value.reason
    assert len(read_dataset(tmp_path, on_bad="skip")) == 1


def test_idrid_missing_groundtruth_split(tmp_path):
    idrid_tree(tmp_path, segmentation={"train": {"IDRiD_01": ["EX"]}, "test": {"IDRiD_55": []}})
    import shutil

    shutil.rmtree(tmp_path / "A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set")
    with pytest.raises(BadInputError, match="b. Testing Set: missing: expected the lesion masks"):
        read_dataset(tmp_path)


def test_idrid_grading_missing_labels_csv_and_bad_grade(tmp_path):
    idrid_tree(tmp_path, grading={"train": {"IDRiD_001": 2}, "test": {"IDRiD_101": 1}})
    groundtruths = tmp_path / "B. Disease Grading" / "2. Groundtruths"
    (groundtruths / "b. IDRiD_Disease Grading_Testing Labels.csv").unlink()
    with pytest.raises(BadInputError, match="no labels for the 1 images in .*b. Testing Set"):
        read_dataset(tmp_path)
    dataset = read_dataset(tmp_path, on_bad="skip")
    assert [r.name for r in dataset.records] == ["IDRiD_001"] and len(dataset.problems) == 1

    table = groundtruths / "a. IDRiD_Disease Grading_Training Labels.csv"
    table.write_text("Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,5,0\n")
    with pytest.raises(BadInputError, match="Training Labels.csv: row 2: grade 5 .*0-4"):
        read_dataset(tmp_path)


# ----------------------------------------------------------------------------
# e-ophtha


def test_eophtha_ex_and_ma(tmp_path):
    eophtha_tree(tmp_path, "EX", {"E0000404": ["DS000DGS"]}, {"E0001": ["H1", "H2"]})
    eophtha_tree(tmp_path, "MA", {"E0000043": ["C0001273", "C0001274"]}, {"E0002": ["H3"]})
    assert detect_layout(tmp_path) == "e-ophtha"
    dataset = read_dataset(tmp_path)
    assert dataset.lesions == ("EX", "MA")
    by_name = {r.name: r for r in dataset.records}
    assert len(by_name) == 6
    assert by_name["DS000DGS"].masks == {
        "EX": tmp_path / "e_optha_EX/Annotation_EX/E0000404/DS000DGS_EX.png"
    }
    assert by_name["DS000DGS"].label == 1
    assert by_name["H1"].masks == {"EX": None} and by_name["H1"].label == 0
    assert by_name["H3"].masks == {"MA": None}
    assert by_name["C0001274"].masks["MA"].name == "C0001274_MA.png"
    assert [len(dataset.with_lesion(c)) for c in ("EX", "MA")] == [3, 3]


def test_eophtha_missing_annotation_and_orphan_annotation(tmp_path):
    eophtha_tree(tmp_path, "EX", {"P1": ["A", "B"]}, {})
    (tmp_path / "e_optha_EX/Annotation_EX/P1/B_EX.png").unlink()
    with pytest.raises(BadInputError, match=r"B.jpg: no EX annotation: expected .*P1/B_EX.png"):
        read_dataset(tmp_path)
    (tmp_path / "e_optha_EX/EX/P1/B.jpg").unlink()
    write_mask(tmp_path / "e_optha_EX/Annotation_EX/P1/C_EX.png")
    with pytest.raises(BadInputError, match=r"C_EX.png: annotation without an image"):
        read_dataset(tmp_path)


# ----------------------------------------------------------------------------
# DDR


def test_ddr_segmentation_and_grading(tmp_path):
    ddr_tree(
        tmp_path,
        segmentation={"train": {"007-1": ["EX", "MA"]}, "valid": {"007-2": ["SE"]}, "test": {}},
        grading={
            "train": {"g1": 0, "g2": 4, "g3": 5},
            "valid": {"g4": 1},
            "test": {"g5": 2},
        },
    )
    assert detect_layout(tmp_path) == "ddr"
    dataset = read_dataset(tmp_path)
    assert dataset.lesions == ("EX", "HE", "MA", "SE")
    by_name = {r.name: r for r in dataset.records}
    assert "g3" not in by_name  # grade 5 = ungradable, left out without complaint
    assert dataset.problems == []
    assert {n: (r.grade, r.split) for n, r in by_name.items() if r.grade is not None} == {
        "g1": (0, "train"),
        "g2": (4, "train"),
        "g4": (1, "valid"),
        "g5": (2, "test"),
    }
    seg = by_name["007-1"]
    assert seg.masks["EX"] == tmp_path / "lesion_segmentation/train/label/EX/007-1.tif"
    assert seg.masks["HE"] is None and seg.masks["SE"] is None and "OD" not in seg.masks
    # DDR ships a mask file for every lesion of every image, empty ones included,
    # so a file's presence says nothing: the label is unknown until decoded.
    assert (seg.label, seg.split, seg.grade) == (None, "train", None)
    assert by_name["007-2"].split == "valid"
    assert read_dataset(tmp_path, layout="ddr-grading").layout == "ddr-grading"


def test_ddr_bad_lines(tmp_path):
    ddr_tree(tmp_path, grading={"train": {"g1": 0, "g2": 1}})
    listing = tmp_path / "DR_grading" / "train.txt"
    listing.write_text("g1.jpg 0\ng2.jpg\n")
    with pytest.raises(BadInputError, match=r"train.txt: line 2: expected '<image file> <grade>'"):
        read_dataset(tmp_path)
    dataset = read_dataset(tmp_path, on_bad="skip")
    assert [r.name for r in dataset.records] == ["g1"]
    assert messages(dataset.problems).count("\n") == 1  # the bad line, then g2 unlabelled
    assert "g2.jpg: image without a label" in messages(dataset.problems)
    listing.write_text("g1.jpg 0\ng2.jpg 6\n")
    with pytest.raises(BadInputError, match="line 2: grade 6 for 'g2.jpg' is out of range"):
        read_dataset(tmp_path)


# ----------------------------------------------------------------------------
# Plain folders


def test_folder_classes(tmp_path):
    for name in ("h1", "h2"):
        write_image(tmp_path / "healthy" / f"{name}.png")
    write_image(tmp_path / "Lesion" / "sub" / "l1.jpg")
    assert detect_layout(tmp_path) == "folder-classes"
    dataset = read_dataset(tmp_path)
    assert {r.name: r.label for r in dataset.records} == {"h1": 0, "h2": 0, "l1": 1}
    assert all(r.grade is None and r.masks == {} for r in dataset.records)


def test_folder_masks(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{name}.jpg")
    write_mask(tmp_path / "masks" / "EX" / "a.png")
    write_mask(tmp_path / "masks" / "OD" / "c.png")
    write_mask(tmp_path / "masks" / "MA" / "b_MA.tif")
    assert detect_layout(tmp_path) == "folder-masks"
    dataset = read_dataset(tmp_path)
    assert dataset.lesions == ("EX", "MA", "OD")
    by_name = {r.name: r for r in dataset.records}
    assert by_name["a"].masks == {"EX": tmp_path / "masks/EX/a.png", "MA": None, "OD": None}
    assert by_name["b"].masks["MA"] == tmp_path / "masks/MA/b_MA.tif"
    assert [by_name[n].label for n in "abc"] == [1, 1, 0]  # OD alone is no lesion

    write_mask(tmp_path / "masks" / "XX" / "a.png")
    with pytest.raises(BadInputError, match=r"masks/XX: unknown lesion folder; expected"):
        read_dataset(tmp_path)
    (tmp_path / "masks/XX/a.png").unlink()
    (tmp_path / "masks/XX").rmdir()
    write_mask(tmp_path / "masks" / "EX" / "zzz.png")
    with pytest.raises(BadInputError, match=r"zzz.png: mask without an image"):
        read_dataset(tmp_path)


# ----------------------------------------------------------------------------
# Detection


def test_detection_errors_name_the_folder_and_the_layouts(tmp_path):
    with pytest.raises(RmibError) as caught:
        detect_layout(tmp_path)
    assert f"{tmp_path}: the folder is empty" in str(caught.value)
    assert "kaggle (trainLabels.csv + train/)" in str(caught.value)

    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RmibError) as caught:
        read_dataset(tmp_path)
    message = str(caught.value)
    assert "no known dataset layout found (the folder holds notes.txt, photos/)" in message
    for name in ("messidor", "aptos", "idrid-grading", "e-ophtha", "ddr-grading", "folder-masks"):
        assert name in message
    assert "\n" not in message


def test_detection_hints_at_a_dataset_one_level_down(tmp_path):
    kaggle_tree(tmp_path / "eyepacs", {"a": 0})
    with pytest.raises(RmibError, match=r"Did you mean .*eyepacs\?"):
        detect_layout(tmp_path)


def test_several_layouts_in_one_folder_is_ambiguous(tmp_path):
    kaggle_tree(tmp_path, {"a": 0})
    write_image(tmp_path / "train_images" / "b.png")
    write_csv(tmp_path / "train.csv", "id_code,diagnosis\nb,0\n")
    with pytest.raises(RmibError, match=r"several layouts \(kaggle, aptos\); choose one"):
        detect_layout(tmp_path)
    assert read_dataset(tmp_path, layout="aptos").records[0].name == "b"


def test_bad_roots_and_layout_names(tmp_path):
    with pytest.raises(RmibError, match="folder not found"):
        read_dataset(tmp_path / "nowhere")
    kaggle_tree(tmp_path, {"a": 0})
    with pytest.raises(RmibError, match="not a folder"):
        read_dataset(tmp_path / "trainLabels.csv")
    with pytest.raises(RmibError, match="unknown dataset layout 'eyepacs'; expected one of"):
        read_dataset(tmp_path, layout="eyepacs")
    with pytest.raises(RmibError, match="not in the ddr layout"):
        read_dataset(tmp_path, layout="ddr")
    with pytest.raises(ValueError, match="on_bad"):
        read_dataset(tmp_path, on_bad="ignore")


def test_no_images_is_an_error(tmp_path):
    write_csv(tmp_path / "trainLabels.csv", "image,level\n")
    (tmp_path / "train").mkdir()
    with pytest.raises(RmibError, match="no usable images found for the kaggle layout"):
        read_dataset(tmp_path)


def test_hidden_and_macos_files_are_ignored(tmp_path):
    kaggle_tree(tmp_path, {"a": 0})
    (tmp_path / "train" / "._a.jpeg").write_bytes(b"\0\5\26\7")
    (tmp_path / "__MACOSX").mkdir()
    assert len(read_dataset(tmp_path)) == 1


# ----------------------------------------------------------------------------
# Checking and summaries


def test_check_dataset_finds_truncated_images_and_wrong_size_masks(tmp_path):
    idrid_tree(tmp_path, segmentation={"train": {"IDRiD_01": ["EX", "MA"], "IDRiD_02": ["HE"]}})
    dataset = read_dataset(tmp_path)
    assert check_dataset(dataset) == []

    image = dataset.records[1].image
    image.write_bytes(image.read_bytes()[:-40])
    mask = dataset.records[0].masks["MA"]
    write_mask(mask, size=(30, 24))
    with pytest.raises(BadInputError) as caught:
        check_dataset(dataset)
    assert caught.value.path == str(mask) and "mask is 30x24 but its image is 32x24" in str(
        caught.value
    )
    problems = check_dataset(dataset, on_bad="skip")
    assert [Path(p).name for p, _ in problems] == ["IDRiD_01_MA.tif", "IDRiD_02.jpg"]
    assert "truncated JPEG" in problems[1][1]


def test_summary_counts_sizes_and_problems(tmp_path):
    idrid_tree(
        tmp_path,
        segmentation={"train": {"IDRiD_01": ["EX", "MA"]}, "test": {"IDRiD_55": ["EX"]}},
        grading={"train": {"IDRiD_001": 0, "IDRiD_002": 3}},
    )
    write_image(
        tmp_path / "B. Disease Grading/1. Original Images/a. Training Set/IDRiD_002.jpg",
        size=(40, 30),
    )
    dataset = read_dataset(tmp_path)
    summary = summarize_dataset(dataset)
    assert summary["layout"] == "idrid" and summary["images"] == 4 and summary["decoded"]
    assert summary["grades"] == {"0": 1, "3": 1}
    assert summary["labels"] == {"healthy": 1, "lesion": 3}
    assert summary["lesions"]["EX"] == {"images": 2, "annotated": 2, "nonempty": 2}
    assert summary["lesions"]["MA"] == {"images": 1, "annotated": 2, "nonempty": 1}
    assert summary["splits"]["test"]["lesions"]["EX"] == {
        "images": 1,
        "annotated": 1,
        "nonempty": 1,
    }
    assert list(summary["splits"]) == ["train", "test"]
    assert summary["sizes"] == {"32x24": 3, "40x30": 1}
    assert summary["problems"] == []

    mask = dataset.records[0].masks["EX"]
    write_mask(mask, size=(16, 16))
    image = dataset.records[1].image
    image.write_bytes(image.read_bytes()[:-40])
    io.write_image(dataset.records[0].masks["MA"], np.zeros((24, 32), np.uint8))
    assert summarize_dataset(dataset)["lesions"]["MA"] == {
        "images": 1,
        "annotated": 2,
        "nonempty": 0,
    }
    quick = summarize_dataset(dataset, decode=False)
    assert quick["lesions"]["MA"] == {"images": 1, "annotated": 2}
    # Headers only: the mask's size is seen, the truncation is not.
    assert [p["path"] for p in quick["problems"]] == [str(mask)]
    assert quick["sizes"] == {"32x24": 3, "40x30": 1}
    full = summarize_dataset(dataset, decode=True)
    assert [p["path"] for p in full["problems"]] == [str(mask), str(image)]
    assert full["sizes"] == {"32x24": 2, "40x30": 1}


def test_summary_includes_problems_the_reader_skipped(tmp_path):
    kaggle_tree(tmp_path, {"a": 0}, unlabelled=("b",))
    summary = summarize_dataset(read_dataset(tmp_path, on_bad="skip"), decode=False)
    assert summary["images"] == 1
    assert [Path(p["path"]).name for p in summary["problems"]] == ["b.jpeg"]


# ----------------------------------------------------------------------------
# Real samples (../shared/data), skipped when absent


def _shared(name):
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def test_real_idrid_sample(tmp_path):
    root = _shared("idrid-sample")
    dataset = read_dataset(root)
    assert dataset.layout == "idrid-segmentation" and len(dataset) == 10
    truths = root / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"
    for code, folder in IDRID_LESION_FOLDERS.items():
        files = sorted((truths / folder).glob(f"IDRiD_*_{code}.tif"))
        assert sorted(r.masks[code] for r in dataset.records if r.masks[code]) == files
        assert sum(r.masks[code] is None for r in dataset.records) == 10 - len(files)
    assert all(r.split == "train" and r.grade is None and r.label == 1 for r in dataset.records)
    # Header sizes of every mask equal the image's; full decodes for one image (5 masks).
    for record in dataset.records:
        size = io.image_size(record.image)
        assert size == (4288, 2848)
        assert all(io.image_size(m) == size for m in record.masks.values() if m)
    record = next(r for r in dataset.records if r.name == "IDRiD_03")
    image = io.read_image(record.image)
    assert record.masks["SE"] is not None
    for code, mask in record.masks.items():
        decoded = io.read_mask(mask, expected_shape=image.shape[:2])
        assert decoded.shape == (2848, 4288) and decoded.any(), code


def test_real_eyepacs_sample():
    root = _shared("eyepacs-sample")
    dataset = read_dataset(root)
    assert dataset.layout == "kaggle" and len(dataset) == 25
    grades = [r.grade for r in dataset.records]
    assert {g: grades.count(g) for g in range(5)} == {0: 5, 1: 5, 2: 5, 3: 5, 4: 5}
    assert [r.label for r in dataset.records] == [int(g > 0) for g in grades]
    assert all(r.image.suffix == ".jpeg" and r.image.is_file() for r in dataset.records)


def test_image_decoding_is_never_needed_to_read(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a reader decoded an image")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(io, "read_image", refuse)
    monkeypatch.setattr(io, "image_size", refuse)
    idrid_tree(tmp_path, segmentation={"train": {"IDRiD_01": ["EX"]}}, grading={"train": {"I": 1}})
    assert len(read_dataset(tmp_path)) == 2
