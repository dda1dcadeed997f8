"""Lesions painted for a DR grade, each with its exact mask: microaneurysms,
haemorrhages, hard and soft exudates."""

from __future__ import annotations

import math

import cv2
import numpy as np

# Drawing order, bottom to top: a pixel belongs to the last lesion drawn on it.
_LESION_ORDER = ("HE", "MA", "EX", "SE")


class _Placer:
    """Random lesion positions inside the FOV, off the disc, not on top of each other."""

    def __init__(self, rng, scene):
        self.rng, self.scene = rng, scene
        self.placed = []  # (y, x, radius)

    def __call__(self, radius, near_fovea=0.0):
        s, rng = self.scene, self.rng
        r = s.radius
        best = None
        for _ in range(60):
            if rng.random() < near_fovea:
                y = s.fovea_y + rng.normal(0, 0.22 * r)
                x = s.fovea_x + rng.normal(0, 0.22 * r)
            else:
                rad = 0.85 * r * math.sqrt(rng.random())
                a = rng.uniform(0, 2 * math.pi)
                y, x = s.cy + rad * math.sin(a), s.cx + rad * math.cos(a)
            if not s.inside(y, x, max(0.08 * r, radius + 2)):
                continue
            if math.hypot(y - s.disc_y, x - s.disc_x) < 1.25 * s.disc_radius + radius:
                continue
            best = (y, x)
            if all(math.hypot(y - py, x - px) > pr + radius + 2 for py, px, pr in self.placed):
                break
        if best is None:  # tiny image: fall back to the middle of the retina
            best = (s.cy, s.cx - 0.3 * r * s.side)
        self.placed.append((best[0], best[1], radius))
        return best


def _pt(y, x):
    return (round(x * 16), round(y * 16))


def _ellipse(canvas, y, x, ay, ax, angle_deg):
    axes = (max(1, round(ax * 16)), max(1, round(ay * 16)))
    cv2.ellipse(canvas, _pt(y, x), axes, angle_deg, 0, 360, 1, -1, cv2.LINE_8, 4)


def _draw_microaneurysms(rng, scene, place, n, canvas):
    for _ in range(n):
        diameter = rng.uniform(2, 8) * scene.scale
        radius = max(0.6, diameter / 2)
        y, x = place(radius, near_fovea=0.5)
        cv2.circle(canvas, _pt(y, x), max(8, round(radius * 16)), 1, -1, cv2.LINE_8, 4)


def _draw_haemorrhages(rng, scene, place, n, canvas, flame_share):
    s = scene.scale
    for _ in range(n):
        kind = (
            "flame" if rng.random() < flame_share else rng.choice(["dot", "blot"], p=[0.45, 0.55])
        )
        if kind == "dot":
            radius = max(1.0, rng.uniform(2.5, 5) * s)
            y, x = place(radius, near_fovea=0.3)
            _ellipse(canvas, y, x, radius, radius * rng.uniform(0.8, 1.0), rng.uniform(0, 180))
        elif kind == "blot":
            size = max(1.5, rng.uniform(4, 10) * s)
            y, x = place(size * 1.4, near_fovea=0.3)
            for _ in range(rng.integers(3, 7)):
                oy, ox = rng.normal(0, 0.45 * size, 2)
                _ellipse(
                    canvas,
                    y + oy,
                    x + ox,
                    size * rng.uniform(0.4, 0.8),
                    size * rng.uniform(0.4, 0.8),
                    rng.uniform(0, 180),
                )
        else:
            length = max(2.0, rng.uniform(8, 20) * s)
            y, x = place(length, near_fovea=0.1)
            # Flame haemorrhages follow the nerve fibres, radially from the disc.
            angle = math.degrees(math.atan2(y - scene.disc_y, x - scene.disc_x))
            width = max(1.0, length * rng.uniform(0.18, 0.3))
            _ellipse(canvas, y, x, width, length, angle)
            tip = math.radians(angle)
            _ellipse(
                canvas,
                y + 0.6 * length * math.sin(tip),
                x + 0.6 * length * math.cos(tip),
                width * 0.6,
                length * 0.55,
                angle,
            )


def _draw_exudates(rng, scene, place, clusters, canvas):
    s = scene.scale
    for _ in range(clusters):
        spread = max(2.0, rng.uniform(6, 22) * s)
        cy, cx = place(spread * 2, near_fovea=0.7)
        ring = rng.random() < 0.3
        for _ in range(rng.integers(3, 18)):
            if ring:  # circinate: a ring round a leaking capillary
                a = rng.uniform(0, 2 * math.pi)
                d = spread * rng.uniform(0.9, 1.3)
                y, x = cy + d * math.sin(a), cx + d * math.cos(a)
            else:
                y, x = cy + rng.normal(0, spread * 0.6), cx + rng.normal(0, spread * 0.6)
            if not scene.inside(y, x, 3):
                continue
            size = max(0.7, rng.uniform(1.2, 4.0) * s)
            if rng.random() < 0.1:
                size *= 2.2  # an occasional plaque
            _ellipse(canvas, y, x, size * rng.uniform(0.5, 1.0), size, rng.uniform(0, 180))
        _ellipse(canvas, cy, cx, max(0.7, 1.5 * s), max(0.7, 2.0 * s), rng.uniform(0, 180))


def _soft_exudates(rng, scene, place, n) -> tuple[np.ndarray, np.ndarray]:
    """Cotton-wool spots: fuzzy pale patches. Returns (alpha, mask); mask = alpha >= half its peak."""
    h, w = scene.height, scene.width
    alpha = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    s = scene.scale
    for _ in range(n):
        size = max(2.0, rng.uniform(9, 20) * s)
        y, x = place(size * 1.8, near_fovea=0.2)
        pad = int(size * 3) + 2
        y0, y1 = max(0, int(y) - pad), min(h, int(y) + pad + 1)
        x0, x1 = max(0, int(x) - pad), min(w, int(x) + pad + 1)
        yy, xx = scene.yy[y0:y1, x0:x1], scene.xx[y0:y1, x0:x1]
        field = np.zeros(yy.shape, np.float32)
        for _ in range(rng.integers(2, 5)):
            gy, gx = y + rng.normal(0, 0.4 * size), x + rng.normal(0, 0.4 * size)
            sa, sb = size * rng.uniform(0.35, 0.7), size * rng.uniform(0.25, 0.5)
            t = rng.uniform(0, math.pi)
            u = (xx - gx) * math.cos(t) + (yy - gy) * math.sin(t)
            v = -(xx - gx) * math.sin(t) + (yy - gy) * math.cos(t)
            field += np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))
        peak = rng.uniform(0.7, 0.9)
        spot = peak * np.clip(field / max(field.max(), 1e-6) * 1.4, 0, 1)
        alpha[y0:y1, x0:x1] = np.maximum(alpha[y0:y1, x0:x1], spot)
        inside = spot >= 0.5 * peak
        mask[y0:y1, x0:x1] |= inside.astype(np.uint8)
    return alpha, mask


def _lesion_counts(rng, grade) -> dict:
    counts = {"MA": 0, "HE": 0, "EX": 0, "SE": 0}
    if grade == 1:
        counts["MA"] = int(rng.integers(1, 7))
    elif grade == 2:
        counts["MA"] = int(rng.integers(3, 16))
        pattern = rng.choice(["HE", "EX", "both"])
        counts["HE"] = int(rng.integers(1, 7)) if pattern in ("HE", "both") else 0
        counts["EX"] = int(rng.integers(1, 4)) if pattern in ("EX", "both") else 0
    elif grade >= 3:
        counts["MA"] = int(rng.integers(10, 31))
        counts["HE"] = int(rng.integers(8, 21))
        counts["EX"] = int(rng.integers(0, 5))
        counts["SE"] = int(rng.integers(1, 5))
    return counts


def paint_lesions(rng, scene, image, grade) -> dict:
    counts = _lesion_counts(rng, grade)
    # Below 256 px the retina has no room for dozens of lesions: fewer, but never none.
    crowd = min(1.0, 2 * scene.scale)
    counts = {k: max(1, round(n * crowd)) if n else 0 for k, n in counts.items()}
    place = _Placer(rng, scene)
    h, w = scene.height, scene.width
    canvases = {k: np.zeros((h, w), np.uint8) for k in ("HE", "MA", "EX")}
    # Large lesions are placed first, while there is room.
    _draw_haemorrhages(rng, scene, place, counts["HE"], canvases["HE"], 0.3 if grade >= 3 else 0.1)
    se_alpha, se_mask = _soft_exudates(rng, scene, place, counts["SE"])
    _draw_exudates(rng, scene, place, counts["EX"], canvases["EX"])
    _draw_microaneurysms(rng, scene, place, counts["MA"], canvases["MA"])

    fov = scene.dist <= scene.radius - 1
    masks = {k: canvases[k].astype(bool) & fov for k in canvases}
    masks["SE"] = se_mask.astype(bool) & fov
    taken = np.zeros((h, w), bool)
    for lesion in reversed(_LESION_ORDER):
        masks[lesion] &= ~taken
        taken |= masks[lesion]

    def alpha_of(mask, sigma):
        return np.clip(cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma) * 1.6, 0, 1)

    dark_he = np.array([0.6, 0.22, 0.2], np.float32) * rng.uniform(0.85, 1.15)
    dark_ma = np.array([0.55, 0.2, 0.2], np.float32) * rng.uniform(0.85, 1.15)
    for lesion in _LESION_ORDER:
        if not masks[lesion].any():
            continue
        if lesion == "SE":
            a = np.where(masks["SE"], np.maximum(se_alpha, 0.5), se_alpha * ~_taken_by(masks, "SE"))
            target = image * 0.35 + np.array([225, 210, 190], np.float32) * 0.7
        else:
            a = alpha_of(masks[lesion], 0.55)
            a = np.where(masks[lesion], np.maximum(a, 0.85), a * ~_taken_by(masks, lesion))
            if lesion == "HE":
                target = image * dark_he
            elif lesion == "MA":
                target = image * dark_ma
            else:
                target = image * np.array([1.1, 1.55, 0.8], np.float32) + np.array(
                    [70, 75, 10], np.float32
                )
        a = a[..., None]
        image[:] = image * (1 - a) + target * a
    return {k: v.astype(np.uint8) for k, v in masks.items()}


def _taken_by(masks, lesion) -> np.ndarray:
    """Pixels owned by lesions drawn after `lesion` (its soft edge must not cover them)."""
    later = _LESION_ORDER[_LESION_ORDER.index(lesion) + 1 :]
    out = np.zeros(next(iter(masks.values())).shape, bool)
    for other in later:
        out |= masks[other].astype(bool)
    return out
