"""Fundus preprocessing: FOV detection, crops, CLAHE, Graham, resize/pad."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from rmib.data import fundus
from rmib.errors import RmibError
from rmib.io import read_image

pytestmark = pytest.mark.timeout(120)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _jpeg(image, quality=75):
    ok, buffer = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buffer, cv2.IMREAD_COLOR)[:, :, ::-1]


def _disc_photo(shape, centre, radius, colour, noise=4.0, seed=0, quality=75):
    """A flat disc on black, with sensor noise everywhere and JPEG artefacts."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape + (3,), np.uint8)
    cv2.circle(image, (centre[1], centre[0]), radius, colour, -1)
    noisy = image.astype(np.float32) + rng.normal(0, noise, image.shape)
    return _jpeg(np.clip(noisy, 0, 255).astype(np.uint8), quality)


def _truth_box(shape, centre, radius):
    cy, cx = centre
    h, w = shape
    return (
        max(0, cy - radius),
        max(0, cx - radius),
        min(h, cy + radius + 1),
        min(w, cx + radius + 1),
    )


# ----------------------------------------------------------------------------- FOV


@pytest.mark.parametrize(
    "shape, centre, radius, colour",
    [
        ((240, 320), (120, 165), 100, (180, 90, 40)),  # whole disc inside
        ((240, 360), (120, 180), 140, (200, 110, 60)),  # disc cut at top and bottom
        ((200, 300), (95, 140), 80, (45, 22, 10)),  # a dark, under-exposed photograph
    ],
)
def test_fov_box_of_a_noisy_jpeg_disc(shape, centre, radius, colour):
    image = _disc_photo(shape, centre, radius, colour)
    box = fundus.fov_box(image)
    truth = _truth_box(shape, centre, radius)
    assert np.abs(np.subtract(box, truth)).max() <= 3, (box, truth)

    disc = np.zeros(shape, np.uint8)
    cv2.circle(disc, (centre[1], centre[0]), radius, 1, -1)
    mask = fundus.fov_mask(image)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.97


def test_fov_mask_fills_dark_holes_and_ignores_border_text():
    image = _disc_photo((200, 260), (100, 130), 85, (190, 100, 50))
    image[90:110, 120:140] = 0  # a black blob inside the retina (lesion, fovea)
    image[5:15, 5:40] = 255  # burnt-in text in the corner
    mask = fundus.fov_mask(image)
    assert mask[100, 130] == 1
    assert mask[5:15, 5:40].sum() == 0
    assert fundus.fov_box(image) == pytest.approx(_truth_box((200, 260), (100, 130), 85), abs=3)


def test_flat_image_is_all_field_of_view():
    image = np.full((40, 50, 3), 120, np.uint8)
    assert fundus.fov_mask(image).all()
    assert fundus.fov_box(image) == (0, 0, 40, 50)
    assert fundus.fov_box(np.zeros((40, 50, 3), np.uint8)) == (0, 0, 40, 50)


def test_large_image_is_analysed_downscaled_but_box_stays_close():
    shape, centre, radius = (1400, 2100), (700, 1000), 640
    image = _disc_photo(shape, centre, radius, (170, 85, 40), quality=90)
    box = fundus.fov_box(image)
    assert np.abs(np.subtract(box, _truth_box(shape, centre, radius))).max() <= 4


def test_fov_crop_and_crop_to_box_cut_image_and_mask_identically():
    shape = (120, 160)
    image = _disc_photo(shape, (60, 85), 50, (180, 90, 40))
    mask = np.zeros(shape, np.uint8)
    mask[40:50, 70:95] = 1
    cropped, box = fundus.fov_crop(image)
    cropped_mask = fundus.crop_to_box(mask, box)
    y0, x0, y1, x1 = box
    assert cropped.shape == (y1 - y0, x1 - x0, 3)
    assert cropped_mask.shape == cropped.shape[:2]
    np.testing.assert_array_equal(cropped, image[y0:y1, x0:x1])
    # The lesion keeps its place relative to the photograph.
    ys, xs = np.nonzero(cropped_mask)
    assert (ys.min() + y0, xs.min() + x0, ys.max() + y0, xs.max() + x0) == (40, 70, 49, 94)


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (5, 5, 3, 10), (0, 0, 11, 10), (-1, 0, 5, 5)])
def test_crop_to_box_refuses_empty_or_outside_boxes(box):
    with pytest.raises(ValueError, match="box"):
        fundus.crop_to_box(np.zeros((10, 10)), box)


def test_functions_refuse_non_rgb_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        fundus.fov_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        fundus.graham(np.zeros((10, 10, 3), np.float32))


def _real_photographs():
    paths = [
        SHARED_DATA / "eyepacs-sample" / "train" / "10_left.jpeg",
        SHARED_DATA / "eyepacs-sample" / "train" / "1002_left.jpeg",
        SHARED_DATA
        / "idrid-sample"
        / "A. Segmentation"
        / "1. Original Images"
        / "a. Training Set"
        / "IDRiD_01.jpg",
    ]
    return [p for p in paths if p.is_file()]


@pytest.mark.parametrize(
    "path", _real_photographs() or [None], ids=lambda p: getattr(p, "name", "none")
)
def test_fov_box_on_real_photographs(path):
    if path is None:
        pytest.skip(f"real samples not found under {SHARED_DATA}")
    image = read_image(path)
    h, w = image.shape[:2]
    scale = 800 / max(h, w)
    image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    y0, x0, y1, x1 = fundus.fov_box(image)

    assert y0 <= h // 2 < y1 and x0 <= w // 2 < x1
    assert (y1 - y0) * (x1 - x0) > 0.5 * h * w
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    if outside.any():
        assert np.percentile(image.max(axis=2)[outside], 99) < 35

    # Hand check: where the middle row and column leave the black surround.
    brightness = cv2.GaussianBlur(image.max(axis=2), (0, 0), 2)
    cols = np.flatnonzero(brightness[h // 2] > 30)
    rows = np.flatnonzero(brightness[:, w // 2] > 30)
    tolerance = 0.03 * w
    assert abs(x0 - cols[0]) <= tolerance and abs(x1 - cols[-1] - 1) <= tolerance
    assert abs(y0 - rows[0]) <= tolerance and abs(y1 - rows[-1] - 1) <= tolerance


# ----------------------------------------------------------------------------- CLAHE


def test_clahe_keeps_a_constant_image_constant():
    image = np.full((256, 192, 3), (150, 80, 40), np.uint8)
    out = fundus.clahe(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.reshape(-1, 3).std(axis=0).max() < 1.0
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 4
    lab_in = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[0, 0].astype(int)
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[0, 0].astype(int)
    assert abs(lab_out[0] - lab_in[0]) <= 3
    assert np.abs(lab_out[1:] - lab_in[1:]).max() <= 1


def test_clahe_stretches_lightness_and_keeps_colour():
    rng = np.random.default_rng(0)
    base = np.full((96, 96, 3), (150, 80, 40), np.float32)
    base *= 1 + 0.05 * rng.standard_normal((96, 96, 1))
    image = np.clip(base, 0, 255).astype(np.uint8)
    out = fundus.clahe(image, clip=2.0, tiles=4)
    lab_in = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(int)
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB).astype(int)
    assert lab_out[..., 0].std() > 1.5 * lab_in[..., 0].std()
    # Hue is kept: A and B move only by colour-conversion rounding.
    assert np.abs(np.median(lab_out[..., 1:] - lab_in[..., 1:], axis=(0, 1))).max() <= 3


def test_clahe_validates_arguments():
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="clip"):
        fundus.clahe(image, clip=0)
    with pytest.raises(ValueError, match="tiles"):
        fundus.clahe(image, tiles=0)


# ----------------------------------------------------------------------------- Graham


def test_graham_maps_a_constant_image_to_128():
    out = fundus.graham(np.full((50, 70, 3), 201, np.uint8))
    assert out.dtype == np.uint8 and out.shape == (50, 70, 3)
    assert (out == 128).all()


def test_graham_matches_a_scipy_reference_with_scaled_sigma():
    rng = np.random.default_rng(1)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (80, 160, 3)), (3, 3, 0))
    image = np.clip(120 + 40 * noise / noise.std(), 0, 255).astype(np.uint8)
    sigma_eff = 10 * 160 / 800  # sigma=10 at 800 px, image 160 px wide: 2 px
    assert sigma_eff == 2.0
    blurred = ndimage.gaussian_filter(
        image.astype(np.float64), (sigma_eff, sigma_eff, 0), mode="mirror", truncate=4.0
    )
    expected = np.clip(np.rint(4 * image.astype(np.float64) - 4 * blurred + 128), 0, 255)
    out = fundus.graham(image, sigma=10)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert ((out > 0) & (out < 255)).mean() > 0.5  # most pixels tested unclipped


def test_graham_enhances_a_small_dark_dot():
    image = np.full((100, 100, 3), 150, np.uint8)
    image[50, 50] = 130
    out = fundus.graham(image, sigma=10)  # sigma_eff = 10 * 100 / 800 = 1.25 px
    assert out[0, 0, 0] == 128
    # By hand: 4 * 130 - 4 * (150 - 20 * w0) + 128 = 128 - 80 * (1 - w0), with w0
    # the centre weight of the normalised 2-D kernel (radius 4 sigma = 5 px).
    x = np.arange(-5, 6)
    g = np.exp(-(x**2) / (2 * 1.25**2))
    w0 = (g[5] / g.sum()) ** 2
    assert abs(int(out[50, 50, 0]) - (128 - 80 * (1 - w0))) <= 1
    assert out[50, 51, 0] > 128  # the dot's neighbours lose a little of its darkness


# ----------------------------------------------------------------------------- IDRiD crop


def test_idrid_centre_crop_offsets_are_exact():
    rows = np.broadcast_to(np.arange(2848)[:, None], (2848, 4288))
    cols = np.broadcast_to(np.arange(4288)[None, :], (2848, 4288))
    assert fundus.idrid_centre_box((2848, 4288)) == (16, 480, 2832, 3808)
    cropped_rows = fundus.idrid_centre_crop(rows)
    cropped_cols = fundus.idrid_centre_crop(cols)
    assert cropped_rows.shape == (2816, 3328)
    assert (cropped_rows[0, 0], cropped_rows[-1, 0]) == (16, 2831)
    assert (cropped_cols[0, 0], cropped_cols[0, -1]) == (480, 3807)
    image = np.broadcast_to(np.zeros(3, np.uint8), (2848, 4288, 3))
    assert fundus.idrid_centre_crop(image).shape == (2816, 3328, 3)


def test_idrid_centre_crop_refuses_small_arrays():
    with pytest.raises(RmibError, match="2816"):
        fundus.idrid_centre_crop(np.zeros((2000, 4288), np.uint8))


# ----------------------------------------------------------------------------- resize/pad


def test_resize_pad_places_and_reports_by_hand():
    image = np.full((60, 100, 3), 200, np.uint8)
    out, t = fundus.resize_pad(image, 50, pad_value=7)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    assert (t.scale, t.top, t.left, t.height, t.width) == (0.5, 10, 0, 30, 50)
    assert (t.original_height, t.original_width) == (60, 100)
    assert (out[:10] == 7).all() and (out[40:] == 7).all() and (out[10:40] == 200).all()

    out, t = fundus.resize_pad(image, (100, 120))
    assert out.shape == (100, 120, 3)
    assert (t.scale, t.top, t.left, t.height, t.width) == (1.2, 14, 0, 72, 120)


def test_resize_pad_round_trip_of_a_mask_is_exact_at_integer_scale():
    rng = np.random.default_rng(2)
    mask = (rng.random((30, 50)) > 0.7).astype(np.uint8)
    out, t = fundus.resize_pad(mask, 200, interpolation=cv2.INTER_NEAREST)
    assert out.shape == (200, 200) and t.scale == 4.0 and t.top == 40
    back = fundus.unresize_pad(out, t, mask.shape, interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(back, mask)


def test_unresize_pad_maps_a_probability_map_back():
    mask = np.zeros((90, 150), np.uint8)
    mask[20:60, 30:100] = 1
    out, t = fundus.resize_pad(mask, 64, interpolation=cv2.INTER_NEAREST)
    probabilities = np.repeat(out[:, :, None].astype(np.float32), 2, axis=2)
    back = fundus.unresize_pad(probabilities, t)
    assert back.shape == (90, 150, 2) and back.dtype == np.float32
    predicted = back[..., 0] > 0.5
    iou = (predicted & (mask > 0)).sum() / (predicted | (mask > 0)).sum()
    assert iou > 0.9
    single, t1 = fundus.resize_pad(np.zeros((20, 30, 1), np.float32), 16)
    assert single.shape == (16, 16, 1)
    assert fundus.unresize_pad(single, t1).shape == (20, 30, 1)


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_dispatches_by_name():
    image = _disc_photo((64, 64), (32, 32), 28, (180, 90, 40))
    assert fundus.preprocess(image, "none") is image
    np.testing.assert_array_equal(fundus.preprocess(image, "clahe"), fundus.clahe(image))
    np.testing.assert_array_equal(fundus.preprocess(image, "graham"), fundus.graham(image))
    assert fundus.PREPROCESSING_METHODS == ("none", "clahe", "graham")


def test_preprocess_names_an_unknown_method_and_the_valid_ones():
    with pytest.raises(RmibError, match=r"'ben'.*none, clahe, graham"):
        fundus.preprocess(np.zeros((8, 8, 3), np.uint8), "ben")
