"""Pictures for people: overlays, comparison maps, contact sheets and training curves."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from rmib.io import atomic_path

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


def history_panels(columns) -> list[tuple[str, list[str]]]:
    """The panels of a run's `history.png`: [(title, [history columns drawn in it])].

    One panel for the loss (with "val_loss"), then one per validation value
    ("val_aupr", with its training counterpart "aupr" when logged); the
    learning rate and the epoch are not drawn.
    """
    columns = list(dict.fromkeys(columns))
    panels = (
        [("loss", [c for c in ("loss", "val_loss") if c in columns])] if "loss" in columns else []
    )
    for column in columns:
        if column.startswith("val_") and column != "val_loss":
            name = column[len("val_") :]
            panels.append((column, [column] + ([name] if name in columns else [])))
    return panels


def save_history_plot(histories: dict, path) -> Path | None:
    """Draw the training curves of a run to `path` (PNG), atomically; one panel each.

    Args:
        histories: {phase or None: rows of the history CSV ({"epoch": n, column: value})}.
            Each phase is its own line (its epochs count from 1); non-finite values
            (epochs not validated) are gaps, single points are marked.
        path: the PNG file to (re)write.

    Returns:
        `path`, or None when there is nothing to draw (no epoch yet).
    """
    # The object-oriented API draws with Agg without touching pyplot's global
    # backend, so a notebook's inline plots keep working.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    histories = {phase: rows for phase, rows in histories.items() if rows}
    columns = [key for rows in histories.values() for row in rows for key in row]
    # A value with no finite epoch yet (validated every N epochs) has no panel yet.
    drawn = {k for rows in histories.values() for row in rows for k in row if _finite(row[k])}
    panels = [(t, keys) for t, keys in history_panels(columns) if drawn & set(keys)]
    if not panels:
        return None
    path = Path(path)
    figure = Figure(figsize=(5, 3 * len(panels)), dpi=80)
    FigureCanvasAgg(figure)
    for index, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        for phase, rows in histories.items():
            epochs = [row["epoch"] for row in rows]
            for key in keys:
                values = [_finite(row.get(key)) for row in rows]
                if all(v is None for v in values):
                    continue
                label = key + (f" ({phase})" if phase else "")
                style = "-" if key == title or key == "val_loss" else "--"
                axes.plot(
                    epochs,
                    [float("nan") if v is None else v for v in values],
                    style,
                    marker="o",
                    markersize=3,
                    label=label,
                )
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _finite(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
