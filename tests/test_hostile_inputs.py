"""Hostile inputs: every bad file gives a clear error naming it, or is handled.

Random bytes under image names, truncated files, odd pixel formats, crafted
headers claiming huge sizes, masks of the wrong size, broken label tables,
and paths with spaces and non-ASCII characters, through `rmib.io`,
`rmib data inspect` and `rmib predict`; then a fuzz run of mutated images.
"""

from __future__ import annotations

import csv
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rmib import io
from rmib.cli import cli
from rmib.errors import BadInputError

pytestmark = pytest.mark.timeout(600)

RNG = np.random.default_rng(0)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PHOTO = (RNG.random((48, 64, 3)) * 255).astype(np.uint8)  # (H, W, RGB)


def run_cli(*args):
    """Invoke the CLI catching everything, as a user's shell would see it."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(result, *names):
    """rmib's error handler answered: SystemExit(1), one 'Error:' line on stderr naming `names`.

    CliRunner catches every exception and never prints its traceback: an error
    that escaped the handler is `result.exception` itself (exit code 1 too), so
    the exception's type and code are what tells a clean error from a crash.
    `test_the_real_entry_point_prints_one_line_and_no_traceback` runs the
    installed entry point, where a traceback would be printed.
    """
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exception.code == 1, repr(result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for name in names:
        assert name in result.output, (name, result.output)


def encode(image: np.ndarray, suffix: str) -> bytes:
    """Encode an RGB / gray / RGBA / 16-bit array with OpenCV (BGR order on disk)."""
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., [2, 1, 0, *range(3, image.shape[2])]]
    ok, buffer = cv2.imencode(suffix, np.ascontiguousarray(image))
    assert ok
    return buffer.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- rmib.io


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_random_bytes_are_refused_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(RNG.bytes(2000))
    with pytest.raises(BadInputError, match="not a readable image") as info:
        io.read_image(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_truncated_files_are_refused(tmp_path, suffix, keep):
    data = encode(PHOTO, suffix)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadInputError) as info:
        io.read_image(path)
    assert info.value.path == str(path)


def test_empty_file_and_folder_named_like_an_image(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty.png"):
        io.read_image(tmp_path / "empty.png")
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(BadInputError, match="folder.jpg"):
        io.read_image(tmp_path / "folder.jpg")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_scaled_to_8_bit(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_bytes(encode(PHOTO.astype(np.uint16) * 257, suffix))  # 8-bit v -> 16-bit 257 v
    image = io.read_image(path)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, PHOTO)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_grayscale_is_repeated_to_three_channels(tmp_path, suffix):
    gray = PHOTO[..., 1]
    path = tmp_path / f"gray{suffix}"
    path.write_bytes(encode(gray, suffix))
    image = io.read_image(path)
    assert image.shape == (*gray.shape, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(
        image[..., 0], image[..., 2]
    )
    tolerance = 8 if suffix == ".jpg" else 0  # JPEG is lossy
    assert np.abs(image[..., 0].astype(int) - gray).max() <= tolerance


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_alpha_is_dropped(tmp_path, suffix):
    alpha = np.full(PHOTO.shape[:2] + (1,), 7, np.uint8)
    path = tmp_path / f"rgba{suffix}"
    path.write_bytes(encode(np.concatenate([PHOTO, alpha], axis=2), suffix))
    np.testing.assert_array_equal(io.read_image(path), PHOTO)


def test_gray_alpha_palette_and_float_images(tmp_path):
    gray = PHOTO[..., 0]
    Image.fromarray(np.dstack([gray, gray]), "LA").save(tmp_path / "la.png")
    Image.fromarray(PHOTO).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    unit = PHOTO[..., 0].astype(np.float32) / 255
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "nan.tif")
    np.testing.assert_array_equal(io.read_image(tmp_path / "la.png")[..., 2], gray)
    assert io.read_image(tmp_path / "p.png").shape == PHOTO.shape
    assert np.abs(io.read_image(tmp_path / "unit.tif")[..., 0].astype(int) - gray).max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nan = io.read_image(tmp_path / "nan.tif")  # all NaN: black, without a warning
    assert nan.shape == (4, 4, 3) and nan.max() == 0


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_one_pixel_image(tmp_path, suffix):
    path = tmp_path / f"dot{suffix}"
    path.write_bytes(encode(np.full((1, 1, 3), 200, np.uint8), suffix))
    image = io.read_image(path)
    assert image.shape == (1, 1, 3) and abs(int(image[0, 0, 0]) - 200) <= 4


def test_huge_header_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(20000, 20000))
    assert path.stat().st_size < 200

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder ran on an oversized image")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(BadInputError, match=r"20000x20000 = 400,000,000 pixels.*--max-pixels"):
        io.read_image(path)
    with pytest.raises(BadInputError, match="bomb.png"):
        io.read_mask(path)


def test_mask_of_the_wrong_size(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(encode(np.zeros((10, 12), np.uint8), ".png"))
    with pytest.raises(BadInputError, match=r"mask is 12x10 but its image is 64x48"):
        io.read_mask(path, expected_shape=PHOTO.shape[:2])


def test_non_ascii_and_spaces_in_paths(tmp_path):
    folder = tmp_path / "données rétine ü"
    folder.mkdir()
    path = folder / "œil gauche 01 ✓.png"
    path.write_bytes(encode(PHOTO, ".png"))
    np.testing.assert_array_equal(io.read_image(path), PHOTO)
    assert io.image_size(path) == (64, 48)


# --------------------------------------------------------------------------- rmib data inspect


@pytest.fixture()
def kaggle(tmp_path):
    """A 4-image Kaggle tree whose root has a space and non-ASCII characters."""
    from rmib.data import synthetic

    return synthetic.write_dataset(tmp_path / "EyePACS échantillon", "kaggle", 4, 64, seed=1)


def write_labels(root: Path, header, rows):
    with open(root / "trainLabels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_inspect_a_clean_tree_with_non_ascii_names(kaggle):
    # Rename one image to a non-ASCII name with a space, and label it so.
    (kaggle / "train" / "10_left.jpeg").rename(kaggle / "train" / "œil 10 gauche.jpeg")
    write_labels(
        kaggle,
        ["image", "level"],
        [["œil 10 gauche", 0], ["10_right", 1], ["11_left", 2], ["11_right", 3]],
    )
    result = run_cli("data", "inspect", kaggle)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["noise", "truncated", "bomb"])
def test_inspect_names_a_bad_image_and_skip_goes_on(kaggle, kind):
    bad = kaggle / "train" / "11_left.jpeg"
    data = bad.read_bytes()
    bad.write_bytes(
        {"noise": RNG.bytes(1500), "truncated": data[: len(data) // 2], "bomb": b""}[kind]
    )
    if kind == "bomb":
        (kaggle / "train" / "11_left.jpeg").unlink()
        (kaggle / "train" / "11_left.png").write_bytes(png_claiming(20000, 20000))
    result = run_cli("data", "inspect", kaggle)
    assert_clean_error(result, "11_left", "bad file")
    result = run_cli("data", "inspect", "--on-bad", "skip", kaggle)
    assert result.exit_code == 0, result.output
    assert "11_left" in result.output  # still listed


def test_inspect_labels_with_extra_columns_are_fine(kaggle):
    rows = [["10_left", 0, "x"], ["10_right", 1, "y"], ["11_left", 2, ""], ["11_right", 3, "z"]]
    write_labels(kaggle, ["image", "level", "comment"], rows)
    result = run_cli("data", "inspect", "--json", kaggle)
    assert result.exit_code == 0, result.output
    assert '"images": 4' in result.output


def test_inspect_labels_missing_a_column(kaggle):
    write_labels(kaggle, ["image"], [["10_left"], ["10_right"]])
    assert_clean_error(run_cli("data", "inspect", kaggle), "trainLabels.csv", "level")


def test_inspect_labels_with_a_non_numeric_grade(kaggle):
    rows = [["10_left", 0], ["10_right", "severe"], ["11_left", 2], ["11_right", 3]]
    write_labels(kaggle, ["image", "level"], rows)
    result = run_cli("data", "inspect", kaggle)
    assert_clean_error(result, "trainLabels.csv", "'severe'", "not a number")
    assert run_cli("data", "inspect", "--on-bad", "skip", kaggle).exit_code == 0


def test_the_real_entry_point_prints_one_line_and_no_traceback(kaggle):
    # `python -m rmib` as a shell runs it: the error is one line on stderr, exit status 1.
    rows = [["10_left", 0], ["10_right", "severe"], ["11_left", 2], ["11_right", 3]]
    write_labels(kaggle, ["image", "level"], rows)
    done = subprocess.run(
        [sys.executable, "-m", "rmib", "data", "inspect", str(kaggle)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), done.stderr
    assert "bad file" in lines[0] and kaggle.name in lines[0], lines[0]
    assert "trainLabels.csv" in done.stdout and "'severe'" in done.stdout, done.stdout


def test_inspect_labels_with_missing_cells(kaggle):
    with open(kaggle / "trainLabels.csv", "w", encoding="utf-8") as f:
        f.write("image,level\n10_left,0\n10_right\n11_left,2\n11_right,3\n")
    assert_clean_error(run_cli("data", "inspect", kaggle), "trainLabels.csv", "10_right")


@pytest.mark.parametrize("suffix", [".xls", ".xlsx"])
def test_inspect_spreadsheet_that_is_not_one(tmp_path, suffix):
    from rmib.data import synthetic

    root = synthetic.write_dataset(tmp_path / "messidor", "messidor", 3, 64, seed=1)
    (table,) = root.rglob("Annotation_Base*")
    table.unlink()
    fake = table.with_suffix(suffix)
    fake.write_text("Image name\tRetinopathy grade\nthis is not a spreadsheet\n")
    assert_clean_error(run_cli("data", "inspect", root), fake.name)


@pytest.fixture(scope="module")
def idrid_copy(tmp_path_factory, synthetic_idrid):
    out = tmp_path_factory.mktemp("idrid") / "IDRiD copy"
    shutil.copytree(synthetic_idrid, out)
    return out


def test_inspect_mask_of_the_wrong_size(idrid_copy):
    mask = sorted(idrid_copy.rglob("*_EX.tif"))[0]
    mask.write_bytes(encode(np.zeros((10, 12), np.uint8), ".tif"))
    result = run_cli("data", "inspect", idrid_copy)
    assert_clean_error(result, "bad file")
    assert mask.name in result.output and "12x10" in result.output


# --------------------------------------------------------------------------- rmib predict


def hostile_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Write good and bad images; return (good stems, bad file names)."""
    folder.mkdir(parents=True, exist_ok=True)
    small = PHOTO[:, :48]
    good = {
        "plain.png": encode(small, ".png"),
        "œil gauche.jpg": encode(small, ".jpg"),
        "deep 16.png": encode(small.astype(np.uint16) * 257, ".png"),
        "gray.tif": encode(small[..., 0], ".tif"),
        "rgba.png": encode(np.concatenate([small, small[..., :1]], axis=2), ".png"),
        "dot.png": encode(np.zeros((1, 1, 3), np.uint8), ".png"),
    }
    jpeg = encode(small, ".jpg")
    bad = {
        "noise.jpg": RNG.bytes(800),
        "noise.png": RNG.bytes(800),
        "noise.tif": RNG.bytes(800),
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "cut.png": good["plain.png"][:200],
        "bomb.png": png_claiming(20000, 20000),
        "empty.jpg": b"",
    }
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    return sorted(Path(n).stem for n in good), sorted(bad)


def read_skipped(out: Path) -> list[str]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as f:
        return sorted(Path(row["file"]).name for row in csv.DictReader(f))


def test_predict_on_hostile_images(tmp_path, segment_run):
    good, bad = hostile_folder(tmp_path / "in put")
    result = run_cli("predict", segment_run, tmp_path / "in put", "--out", tmp_path / "a",
                     "--tile", 64)  # fmt: skip
    assert_clean_error(result)
    assert any(name in result.output for name in bad)

    out = tmp_path / "sortie ü"
    result = run_cli("predict", segment_run, tmp_path / "in put", "--out", out, "--tile", 64,
                     "--on-bad", "skip")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(good)} image(s) predicted" in result.output
    assert read_skipped(out) == bad
    for stem in good:
        prob = cv2.imdecode(np.fromfile(out / f"{stem}_prob.png", np.uint8), cv2.IMREAD_UNCHANGED)
        assert prob.dtype == np.uint16 and prob.ndim == 2
    assert (out / "œil gauche_mask.png").is_file()


def test_predict_missing_file_is_a_clean_error(tmp_path, segment_run):
    result = run_cli("predict", segment_run, tmp_path / "absent.png", "--out", tmp_path / "o")
    assert_clean_error(result, "absent.png")


# --------------------------------------------------------------------------- fuzzing


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(data)
    kind = rng.choice(["bit flips", "truncation", "header", "burst"])
    if kind == "bit flips":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        data = data[: rng.randrange(1, len(data))]
    elif kind == "header":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(64, len(data)))] = rng.randrange(256)
    else:
        start = rng.randrange(len(data))
        for i in range(start, min(len(data), start + rng.randint(4, 64))):
            data[i] = rng.randrange(256)
    return kind, bytes(data)


FUZZ_SEEDS = {
    ".jpg": encode(PHOTO[:, :48], ".jpg"),
    ".png": encode(PHOTO[:, :48], ".png"),
    ".tif": encode(PHOTO[:, :48], ".tif"),
}
FUZZ_COUNT = 150


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(1234)
    for i in range(FUZZ_COUNT):
        suffix = rng.choice(sorted(FUZZ_SEEDS))
        kind, data = mutate(FUZZ_SEEDS[suffix], rng)
        (folder / f"fuzz_{i:03d}_{kind.replace(' ', '_')}{suffix}").write_bytes(data)
    return folder


def test_fuzzed_images_decode_or_raise_bad_input(fuzzed):
    outcomes = {"decoded": [], "refused": []}
    for path in sorted(fuzzed.iterdir()):
        try:
            image = io.read_image(path)
        except BadInputError as exc:
            assert exc.path == str(path)
            outcomes["refused"].append(path.name)
            continue
        # Anything else would propagate and fail the test.
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path
        assert image.shape[0] >= 1 and image.shape[1] >= 1
        assert image.flags["C_CONTIGUOUS"]
        outcomes["decoded"].append(path.name)
        try:
            mask = io.read_mask(path)
        except BadInputError:
            continue
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert len(outcomes["decoded"]) + len(outcomes["refused"]) == FUZZ_COUNT
    # The mutations are harsh enough to break some files and mild enough to spare some.
    assert outcomes["refused"] and outcomes["decoded"]


def test_fuzzed_images_through_predict_with_one_model_load(fuzzed, tmp_path, segment_run):
    expected_refused = []
    for path in sorted(fuzzed.iterdir()):
        try:
            io.set_max_pixels(64 * 64)  # the same limit as below
            io.read_image(path)
        except BadInputError:
            expected_refused.append(path.name)
        finally:
            io.set_max_pixels(None)
    out = tmp_path / "out"
    # A header mutated to claim a bigger image is refused, so tiling stays small.
    result = run_cli("predict", segment_run, fuzzed, "--out", out, "--tile", 64,
                     "--on-bad", "skip", "--max-pixels", 64 * 64)  # fmt: skip
    io.set_max_pixels(None)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    predicted = FUZZ_COUNT - len(expected_refused)
    assert f"{predicted} image(s) predicted" in result.output
    assert read_skipped(out) == sorted(expected_refused)
    assert len(list(out.glob("*_prob.png"))) == predicted
