"""Pictures for people: overlays, comparison maps and contact sheets."""

from __future__ import annotations

import cv2
import numpy as np

# Colours of the RMIB paper's comparison figures (RGB).
TP_COLOUR = (255, 255, 0)  # yellow
FP_COLOUR = (0, 255, 0)  # green
FN_COLOUR = (255, 0, 0)  # red
LESION_COLOURS = {
    "EX": (255, 255, 0),
    "HE": (255, 0, 0),
    "MA": (0, 255, 255),
    "SE": (255, 0, 255),
    "OD": (0, 0, 255),
}


def comparison_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB map: true positives yellow, false positives green, false negatives red,
    true negatives black (as in the RMIB paper's figures)."""
    pred = np.asarray(pred) > 0
    truth = np.asarray(truth) > 0
    out = np.zeros(pred.shape + (3,), np.uint8)
    out[pred & truth] = TP_COLOUR
    out[pred & ~truth] = FP_COLOUR
    out[~pred & truth] = FN_COLOUR
    return out


def probability_overlay(image: np.ndarray, prob: np.ndarray, colour=(255, 255, 0), alpha=0.6):
    """The photograph with the probability map blended in `colour` (opacity = alpha * p)."""
    image = np.asarray(image, np.float32)
    weight = alpha * np.clip(np.asarray(prob, np.float32), 0.0, 1.0)[..., None]
    out = image * (1.0 - weight) + np.asarray(colour, np.float32) * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def mask_outline_overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 0), thickness=1):
    """The photograph with the outlines of a binary mask drawn in `colour`."""
    out = np.ascontiguousarray(np.asarray(image, np.uint8).copy())
    contours, _ = cv2.findContours(
        (np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness)
    return out


def masks_overlay(image: np.ndarray, masks: dict, alpha=0.7):
    """The photograph with every lesion mask painted in its lesion colour."""
    out = np.asarray(image, np.float32).copy()
    for lesion, mask in masks.items():
        if mask is None:
            continue
        colour = np.asarray(LESION_COLOURS.get(lesion, (255, 255, 255)), np.float32)
        hit = np.asarray(mask) > 0
        out[hit] = out[hit] * (1 - alpha) + colour * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(rows, tile=256, labels=None, gap=4):
    """Arrange images (each row a list of (H, W, 3) or (H, W) arrays) into one RGB sheet.

    Each image is resized to fit a tile x tile cell (aspect kept); `labels`, a
    list of column titles, is written on top.
    """
    ncols = max(len(r) for r in rows)
    header = 24 if labels else 0
    height = header + len(rows) * (tile + gap) + gap
    width = ncols * (tile + gap) + gap
    sheet = np.full((height, width, 3), 255, np.uint8)
    for j, label in enumerate(labels or []):
        x = gap + j * (tile + gap)
        cv2.putText(sheet, str(label), (x + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            image = np.asarray(image)
            if image.ndim == 2:
                scale = 255 if image.max() <= 1 else 1
                image = np.repeat((image * scale).astype(np.uint8)[..., None], 3, axis=2)
            h, w = image.shape[:2]
            factor = tile / max(h, w)
            resized = cv2.resize(
                image, (max(1, round(w * factor)), max(1, round(h * factor))), cv2.INTER_AREA
            )
            y0 = header + gap + i * (tile + gap) + (tile - resized.shape[0]) // 2
            x0 = gap + j * (tile + gap) + (tile - resized.shape[1]) // 2
            sheet[y0 : y0 + resized.shape[0], x0 : x0 + resized.shape[1]] = resized
    return sheet
