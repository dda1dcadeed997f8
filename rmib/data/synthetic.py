"""Procedural fundus photographs with exact lesion masks, and datasets of them on disk.

`synthesize_fundus` paints a photograph the way a fundus camera sees the
retina: a circular field of view on black with vignetting, an orange-red
textured background, a vessel tree branching out of a bright optic disc, a
darker macula, and lesions drawn for a DR grade picked first:

    0 none; 1 microaneurysms only; 2 microaneurysms plus haemorrhages and/or
    hard exudates; 3 many haemorrhages, soft exudates; 4 as 3 plus new vessels.

Masks are exact (each pixel belongs to at most one lesion, the one drawn on
top), so a model can learn them. `write_dataset` lays such photographs out on
disk in the folder structure of a public dataset (IDRiD, Kaggle, Messidor,
DDR, APTOS, e-ophtha or a plain folder), so readers, pipelines and commands
can be tested end to end without the real data.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np

from rmib.errors import RmibError
from rmib.io import atomic_path, atomic_write, write_image

LAYOUTS = ("idrid", "kaggle", "messidor", "ddr", "aptos", "e-ophtha", "folder", "folder-classes")
MASK_KEYS = ("EX", "HE", "MA", "SE", "OD")
# Drawing order, bottom to top: a pixel belongs to the last lesion drawn on it.
_LESION_ORDER = ("HE", "MA", "EX", "SE")
_GRADES = 5


# --------------------------------------------------------------------------- geometry


def _parse_size(size) -> tuple[int, int]:
    if np.isscalar(size):
        height = width = int(size)
    else:
        height, width = (int(v) for v in size)
    if height < 32 or width < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    return height, width


class _Scene:
    """Where things are in one photograph (pixel coordinates, y down)."""

    def __init__(self, rng, height, width):
        self.height, self.width = height, width
        half = min(height, width) / 2
        self.radius = half * rng.uniform(0.86, 0.95)
        self.cy = height / 2 + rng.normal(0, 0.01) * half
        self.cx = width / 2 + rng.normal(0, 0.01) * half
        # side = +1: disc right of the centre (a right eye as photographed).
        self.side = int(rng.choice([-1, 1]))
        r = self.radius
        self.disc_y = self.cy + rng.uniform(-0.1, 0.02) * r
        self.disc_x = self.cx + self.side * rng.uniform(0.5, 0.62) * r
        self.disc_radius = rng.uniform(0.12, 0.15) * r
        self.fovea_y = self.disc_y + rng.uniform(0.05, 0.12) * r
        self.fovea_x = self.cx - self.side * rng.uniform(0.0, 0.08) * r
        # Lesion sizes are given at 512 px and scale with the image.
        self.scale = min(height, width) / 512
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.dist = np.hypot(yy - self.cy, xx - self.cx)

    def inside(self, y, x, margin=0.0) -> bool:
        return math.hypot(y - self.cy, x - self.cx) <= self.radius - margin


def _smooth_noise(rng, height, width, cells) -> np.ndarray:
    """Noise of about unit std with about `cells` blobs along the longer side."""
    cells = max(2, int(cells))
    ch = max(2, round(cells * height / max(height, width)))
    cw = max(2, round(cells * width / max(height, width)))
    grid = rng.standard_normal((ch, cw), dtype=np.float32)
    grid = (grid - grid.mean()) / (grid.std() + 1e-6)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- background


def _background(rng, scene) -> np.ndarray:
    h, w, r = scene.height, scene.width, scene.radius
    # From orange-red through brown to a pale, greyish fundus.
    palettes = np.array(
        [[0.86, 0.40, 0.16], [0.80, 0.36, 0.12], [0.70, 0.42, 0.26], [0.84, 0.62, 0.48]],
        np.float32,
    )
    weights = rng.dirichlet([3.0, 2.0, 1.0, 0.6])
    colour = (weights @ palettes * rng.uniform(0.78, 1.08) * 255).astype(np.float32)

    # Illumination, texture and the macula are smooth: they are computed on a
    # small grid (pixel centres mapped to full-size coordinates) and enlarged once.
    factor = min(1.0, 128 / max(h, w))
    sh, sw = max(8, round(h * factor)), max(8, round(w * factor))
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    yy = (yy + 0.5) * (h / sh) - 0.5
    xx = (xx + 0.5) * (w / sw) - 0.5

    texture = 1 + 0.07 * _smooth_noise(rng, sh, sw, 4) + 0.035 * _smooth_noise(rng, sh, sw, 14)
    tint = 0.03 * _smooth_noise(rng, sh, sw, 6)  # red/green balance drifts across the retina
    oy, ox = rng.normal(0, 0.08, 2) * r
    d = np.hypot(yy - scene.cy - oy, xx - scene.cx - ox) / r
    vignette = np.clip(1 - rng.uniform(0.35, 0.6) * d ** rng.uniform(2.2, 3.5), 0.15, 1)
    # The posterior pole around the disc is lit more evenly and a little brighter.
    glow = np.exp(-((yy - scene.disc_y) ** 2 + (xx - scene.disc_x) ** 2) / (2 * (0.35 * r) ** 2))
    light = texture * vignette * (1 + 0.12 * glow)
    # The macula is darker and browner; the fovea is a small darker pit.
    df2 = (yy - scene.fovea_y) ** 2 + (xx - scene.fovea_x) ** 2
    macula = rng.uniform(0.25, 0.45) * np.exp(-df2 / (2 * (0.14 * r) ** 2))
    macula += 0.15 * np.exp(-df2 / (2 * (0.025 * r) ** 2))

    field = np.empty((sh, sw, 3), np.float32)
    field[..., 0] = colour[0] * light * (1 + tint) * (1 - 0.7 * macula)
    field[..., 1] = colour[1] * light * (1 - tint) * (1 - macula)
    field[..., 2] = colour[2] * light * (1 - 0.5 * tint) * (1 - 0.9 * macula)
    image = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)
    fine = _smooth_noise(rng, h, w, max(h, w) / 5)  # choroidal grain
    image *= (1 + 0.02 * fine)[..., None]
    return image


def _optic_disc(rng, scene, image) -> np.ndarray:
    """Paint the disc (pale, with a bright cup) and return its mask."""
    rd = scene.disc_radius
    ax = rd * rng.uniform(0.9, 1.0)
    ay = rd * rng.uniform(1.0, 1.1)
    rim = np.array([255, 195, 100], np.float32) * rng.uniform(0.92, 1.05)
    strength = rng.uniform(0.8, 0.92)
    mask = np.zeros((scene.height, scene.width), np.uint8)
    # Everything happens within 1.4 disc radii (the halo ends at 1.35).
    pad = int(1.4 * rd * 1.1) + 2
    y0, y1 = max(0, int(scene.disc_y) - pad), min(scene.height, int(scene.disc_y) + pad + 1)
    x0, x1 = max(0, int(scene.disc_x) - pad), min(scene.width, int(scene.disc_x) + pad + 1)
    yy, xx = scene.yy[y0:y1, x0:x1], scene.xx[y0:y1, x0:x1]
    patch = image[y0:y1, x0:x1]
    rho = np.hypot((xx - scene.disc_x) / ax, (yy - scene.disc_y) / ay)
    alpha = (np.clip(0.5 + (1 - rho) / 0.1, 0, 1) * strength)[..., None]
    cup_x = scene.disc_x - scene.side * 0.15 * rd
    cup = np.exp(-((xx - cup_x) ** 2 + (yy - scene.disc_y) ** 2) / (2 * (0.3 * rd) ** 2))
    white = np.array([255, 245, 215], np.float32)
    colour = rim + cup[..., None] * (white - rim)
    # Peripapillary halo: a faint pale ring fading outwards.
    halo = (np.clip(1.25 - rho, 0, 0.25) * (rho > 1) * 0.3)[..., None]
    patch += halo * (rim - patch)
    patch[:] = patch * (1 - alpha) + colour * alpha
    mask[y0:y1, x0:x1] = rho <= 1
    return mask


# --------------------------------------------------------------------------- vessels


def _grow_tree(rng, scene, start, angle, width, curvature, segments, kind, budget):
    """Random-walk one vessel and its branches; append (width, p0, p1, kind) segments."""
    r = scene.radius
    step = max(1.5, 0.022 * r)
    min_width = max(0.4, 0.0025 * r)
    taper = 0.985
    stack = [(start[0], start[1], angle, width, curvature, 0)]
    while stack and budget[0] > 0:
        y, x, ang, w, curv, depth = stack.pop()
        budget[0] -= 1
        next_branch = rng.integers(5, 12)
        for k in range(200):
            ang += curv * 0.96**k + rng.normal(0, 0.05)
            ny, nx = y + step * math.sin(ang), x + step * math.cos(ang)
            segments.append((w, (x, y), (nx, ny), kind))
            y, x = ny, nx
            w *= taper
            if w < min_width or not scene.inside(y, x, -0.02 * r):
                break
            if math.hypot(y - scene.fovea_y, x - scene.fovea_x) < 0.1 * r:
                break
            if k >= next_branch and depth < 4:
                turn = rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
                child = w * rng.uniform(0.45, 0.75)
                stack.append((y, x, ang + turn, child, rng.normal(0, 0.02), depth + 1))
                w *= rng.uniform(0.85, 0.95)
                ang -= 0.25 * turn
                next_branch = k + rng.integers(6, 14)


def _vessel_segments(rng, scene, grade):
    r, side = scene.radius, scene.side
    segments = []
    budget = [140]
    start = (scene.disc_y, scene.disc_x)
    vein, artery = 0.021 * r, 0.015 * r
    trunks = [
        # (angle, curvature): temporal arcades leave the disc vertically and
        # bend round the macula; nasal vessels fan out away from it.
        (-math.pi / 2 + side * 0.25, -side * 0.065),
        (math.pi / 2 - side * 0.25, side * 0.065),
        (math.atan2(-0.7, side), 0.0),
        (math.atan2(0.7, side), 0.0),
    ]
    for base, curv in trunks:
        for kind, width, offset in (("vein", vein, 0.18), ("artery", artery, -0.18)):
            angle = base + offset * rng.uniform(0.5, 1.2)
            _grow_tree(
                rng,
                scene,
                start,
                angle,
                width * rng.uniform(0.85, 1.1),
                curv,
                segments,
                kind,
                budget,
            )
    # Small papillomacular vessels heading for the macula.
    toward = math.atan2(scene.fovea_y - scene.disc_y, scene.fovea_x - scene.disc_x)
    for _ in range(rng.integers(2, 5)):
        budget[0] = max(budget[0], 6)
        _grow_tree(
            rng,
            scene,
            start,
            toward + rng.normal(0, 0.35),
            0.006 * r,
            0.0,
            segments,
            "artery",
            budget,
        )
    if grade >= 4:
        _new_vessels(rng, scene, segments)
    return segments


def _new_vessels(rng, scene, segments):
    """Proliferative DR: tufts of fine, tortuous new vessels on or near the disc and arcades."""
    r = scene.radius
    step = max(0.8, 0.008 * r)
    for cluster in range(rng.integers(1, 4)):
        if cluster == 0:  # neovascularisation of the disc
            cy, cx = scene.disc_y, scene.disc_x
        else:
            a = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.3, 0.7) * r
            cy, cx = scene.cy + d * math.sin(a), scene.cx + d * math.cos(a)
        for _ in range(rng.integers(6, 12)):
            y = cy + rng.normal(0, 0.03 * r)
            x = cx + rng.normal(0, 0.03 * r)
            ang = rng.uniform(0, 2 * math.pi)
            turn = rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)
            w = max(0.6, 0.004 * r)
            for _ in range(rng.integers(12, 30)):
                ang += turn + rng.normal(0, 0.35)
                ny, nx = y + step * math.sin(ang), x + step * math.cos(ang)
                if not scene.inside(ny, nx, 2):
                    break
                segments.append((w, (x, y), (nx, ny), "new"))
                y, x = ny, nx


def _draw_vessels(scene, segments) -> dict:
    """Rasterise segments into one 0..1 coverage map per vessel kind."""
    maps = {}
    shift = 4  # sub-pixel end points
    for kind in ("vein", "artery", "new"):
        canvas = np.zeros((scene.height, scene.width), np.uint8)
        # Thin (faint) first, so thick vessels drawn later are never dimmed.
        items = sorted((s for s in segments if s[3] == kind), key=lambda s: s[0])
        for w, p0, p1, _ in items:
            thickness = max(1, round(w))
            # New vessels are fine but full of blood: drawn at full contrast.
            value = 255 if kind == "new" else int(255 * min(1.0, w / 2) ** 0.8)
            a = (round(p0[0] * 16), round(p0[1] * 16))
            b = (round(p1[0] * 16), round(p1[1] * 16))
            cv2.line(canvas, a, b, value, thickness, cv2.LINE_AA, shift)
        maps[kind] = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.6)
    return maps


def _apply_vessels(rng, image, maps):
    absorb = {
        "vein": np.array([0.42, 0.62, 0.55], np.float32) * rng.uniform(0.9, 1.1),
        "artery": np.array([0.22, 0.48, 0.42], np.float32) * rng.uniform(0.9, 1.1),
        "new": np.array([0.25, 0.55, 0.5], np.float32),
    }
    for kind, coverage in maps.items():
        if coverage.any():
            image *= 1 - coverage[..., None] * absorb[kind]


# --------------------------------------------------------------------------- lesions


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


def _paint_lesions(rng, scene, image, grade) -> dict:
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


# --------------------------------------------------------------------------- photograph


def _synthesize(size, seed, grade=None) -> dict:
    height, width = _parse_size(size)
    rng = np.random.default_rng(seed)
    if grade is None:
        grade = int(rng.integers(0, _GRADES))
    if grade not in range(_GRADES):
        raise ValueError(f"grade must be 0-4, got {grade}")
    scene = _Scene(rng, height, width)
    image = _background(rng, scene)
    od = _optic_disc(rng, scene, image)
    _apply_vessels(rng, image, _draw_vessels(scene, _vessel_segments(rng, scene, grade)))
    lesions = _paint_lesions(rng, scene, image, grade)

    image = cv2.GaussianBlur(image, (0, 0), 0.5)  # camera optics
    edge = np.clip(scene.radius - scene.dist + 0.5, 0, 1)
    image *= edge[..., None]
    image += 1.5 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    masks = {**lesions, "OD": od & (scene.dist <= scene.radius - 1)}
    return {"image": image, "masks": masks, "grade": int(grade), "scene": scene}


def synthesize_fundus(size, seed, grade=None) -> tuple[np.ndarray, dict, int]:
    """Paint one synthetic fundus photograph with exact lesion masks.

    Args:
        size: side of a square image, or (height, width); at least 32.
        seed: anything `numpy.random.default_rng` takes; the same seed gives
            the same photograph.
        grade: DR grade 0-4 to draw lesions for; None picks one from the seed.

    Returns:
        (image, masks, grade): uint8 RGB (H, W, 3); masks "EX", "HE", "MA",
        "SE", "OD" -> uint8 (H, W) 0/1; the grade. Lesions are consistent
        with the grade (0: none; 1: MA only; 2: MA with HE and/or EX; 3: many
        HE, SE; 4: as 3 with new vessels) and lie inside the field of view.

    Example:
        >>> image, masks, grade = synthesize_fundus(256, seed=0, grade=2)
        >>> image.shape, bool(masks["MA"].any())
        ((256, 256, 3), True)
    """
    sample = _synthesize(size, seed, grade)
    return sample["image"], sample["masks"], sample["grade"]


# --------------------------------------------------------------------------- datasets


def _samples(count, size, seed):
    """Yield (index, sample) with grades balanced over the dataset."""
    rng = np.random.default_rng(seed)
    grades = rng.permutation(np.arange(count) % _GRADES)
    seeds = rng.integers(0, 2**31 - 1, count)
    for i in range(count):
        yield i, _synthesize(size, int(seeds[i]), int(grades[i]))


def _macular_edema_risk(sample) -> int:
    """IDRiD/Messidor risk of macular edema: 0 no exudates, 1 none within a disc
    diameter of the fovea, 2 some within it."""
    ex = sample["masks"]["EX"]
    if not ex.any():
        return 0
    s = sample["scene"]
    ys, xs = np.nonzero(ex)
    near = np.hypot(ys - s.fovea_y, xs - s.fovea_x).min() <= 2 * s.disc_radius
    return 2 if near else 1


def _split(count, fractions) -> list:
    """Split names for `count` items, every split non-empty when count allows."""
    sizes = [int(round(f * count)) for f in fractions]
    for i in range(len(sizes)):
        if count >= len(sizes) and sizes[i] == 0:
            sizes[i] = 1
    while sum(sizes) > count:
        sizes[int(np.argmax(sizes))] -= 1
    sizes[0] += count - sum(sizes)
    out = []
    for i, n in enumerate(sizes):
        out += [i] * n
    return out


def _binary(mask) -> np.ndarray:
    return (mask > 0).astype(np.uint8) * 255


def _red(mask) -> np.ndarray:
    out = np.zeros(mask.shape + (3,), np.uint8)
    out[..., 0] = _binary(mask)
    return out


def _write_csv(path, header, rows):
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


_IDRID_MASK_DIRS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}
_IDRID_SPLITS = ("a. Training Set", "b. Testing Set")


def _write_idrid(out, count, size, seed):
    seg = out / "A. Segmentation"
    grading = out / "B. Disease Grading"
    splits = _split(count, (0.7, 0.3))
    seg_digits = max(2, len(str(count)))
    labels = {0: [], 1: []}
    for i, sample in _samples(count, size, seed):
        split = splits[i]
        name = f"IDRiD_{i + 1:0{seg_digits}d}"
        write_image(
            seg / "1. Original Images" / _IDRID_SPLITS[split] / f"{name}.jpg", sample["image"]
        )
        truth = seg / "2. All Segmentation Groundtruths" / _IDRID_SPLITS[split]
        for lesion, folder in _IDRID_MASK_DIRS.items():
            mask = sample["masks"][lesion]
            if mask.any():  # as in IDRiD, an absent lesion has no file
                write_image(truth / folder / f"{name}_{lesion}.tif", _red(mask))
        # The grading part numbers each split from 001, as IDRiD does.
        number = len(labels[split]) + 1
        grade_name = f"IDRiD_{number:0{max(3, len(str(count)))}d}"
        image_dir = grading / "1. Original Images" / _IDRID_SPLITS[split]
        write_image(image_dir / f"{grade_name}.jpg", sample["image"])
        labels[split].append((grade_name, sample["grade"], _macular_edema_risk(sample)))
    header = ["Image name", "Retinopathy grade", "Risk of macular edema "]
    truths = grading / "2. Groundtruths"
    _write_csv(truths / "a. IDRiD_Disease Grading_Training Labels.csv", header, labels[0])
    _write_csv(truths / "b. IDRiD_Disease Grading_Testing Labels.csv", header, labels[1])


def _write_kaggle(out, count, size, seed):
    rows = []
    for i, sample in _samples(count, size, seed):
        name = f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}"
        write_image(out / "train" / f"{name}.jpeg", sample["image"])
        rows.append((name, sample["grade"]))
    _write_csv(out / "trainLabels.csv", ["image", "level"], rows)


def _write_aptos(out, count, size, seed):
    rng = np.random.default_rng([seed, 1])
    rows = []
    for _, sample in _samples(count, size, seed):
        id_code = "".join(f"{b:02x}" for b in rng.integers(0, 256, 6))
        write_image(out / "train_images" / f"{id_code}.png", sample["image"])
        rows.append((id_code, sample["grade"]))
    _write_csv(out / "train.csv", ["id_code", "diagnosis"], rows)


def _write_messidor(out, count, size, seed):
    import openpyxl

    bases = {}
    for i, sample in _samples(count, size, seed):
        base = f"Base{11 + i // 100}"  # Messidor bases hold 100 images each
        name = f"20051019_{38557 + i:05d}_0100_PP.tif"
        write_image(out / base / name, sample["image"])
        # Messidor grades 0-3; its grade 3 covers proliferative retinopathy.
        grade = min(sample["grade"], 3)
        bases.setdefault(base, []).append(
            (name, "Service Ophtalmologie Lariboisiere", grade, _macular_edema_risk(sample))
        )
    for base, rows in bases.items():
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(
            [
                "Image name",
                "Ophthalmologic department",
                "Retinopathy grade",
                "Risk of macular edema ",
            ]
        )
        for row in rows:
            sheet.append(list(row))
        with atomic_path(out / base / f"Annotation_{base}.xlsx") as tmp:
            book.save(tmp)


_DDR_SPLITS = ("train", "valid", "test")


def _write_ddr(out, count, size, seed):
    splits = _split(count, (0.6, 0.2, 0.2))
    lines = {s: [] for s in _DDR_SPLITS}
    for i, sample in _samples(count, size, seed):
        split = _DDR_SPLITS[splits[i]]
        name = f"2017{i:013d}"
        seg = out / "lesion_segmentation" / split
        write_image(seg / "image" / f"{name}.jpg", sample["image"])
        for lesion in ("EX", "HE", "MA", "SE"):  # DDR has a (possibly empty) label for each
            write_image(seg / "label" / lesion / f"{name}.tif", _binary(sample["masks"][lesion]))
        write_image(out / "DR_grading" / split / f"{name}.jpg", sample["image"])
        lines[split].append(f"{name}.jpg {sample['grade']}\n")
    for split, rows in lines.items():
        with atomic_write(out / "DR_grading" / f"{split}.txt") as f:
            f.writelines(rows)


def _write_eophtha(out, count, size, seed):
    healthy_turn = 0
    for i, sample in _samples(count, size, seed):
        patient = f"E{i // 2:07d}"
        name = f"C{i:07d}"
        masks = sample["masks"]
        for lesion in ("EX", "MA"):
            tree = out / f"e_optha_{lesion}"
            if masks[lesion].any():
                write_image(tree / lesion / patient / f"{name}.jpg", sample["image"])
                write_image(
                    tree / f"Annotation_{lesion}" / patient / f"{name}_{lesion}.png",
                    _binary(masks[lesion]),
                )
        if sample["grade"] == 0:
            # Healthy photographs alternate between the two trees.
            lesion = ("EX", "MA")[healthy_turn % 2]
            healthy_turn += 1
            write_image(
                out / f"e_optha_{lesion}" / "healthy" / patient / f"{name}.jpg", sample["image"]
            )


def _write_folder(out, count, size, seed):
    for i, sample in _samples(count, size, seed):
        name = f"fundus_{i:04d}"
        write_image(out / "images" / f"{name}.jpg", sample["image"])
        for lesion in MASK_KEYS:
            # A missing file means "annotated and absent"; the empty folder
            # still says the lesion type is annotated.
            (out / "masks" / lesion).mkdir(parents=True, exist_ok=True)
            if sample["masks"][lesion].any():
                write_image(
                    out / "masks" / lesion / f"{name}.png", _binary(sample["masks"][lesion])
                )


def _write_folder_classes(out, count, size, seed):
    for i, sample in _samples(count, size, seed):
        folder = "lesion" if sample["grade"] > 0 else "healthy"
        write_image(out / folder / f"fundus_{i:04d}.jpg", sample["image"])


_WRITERS = {
    "idrid": _write_idrid,
    "kaggle": _write_kaggle,
    "messidor": _write_messidor,
    "ddr": _write_ddr,
    "aptos": _write_aptos,
    "e-ophtha": _write_eophtha,
    "folder": _write_folder,
    "folder-classes": _write_folder_classes,
}


def write_dataset(out, layout: str, count: int, size, seed: int = 0) -> Path:
    """Write `count` synthetic photographs in the on-disk layout of a public dataset.

    Grades are balanced over the dataset (0-4 in turn, shuffled). Every file
    is written atomically; files already under `out` are left alone unless
    they have the same name.

    Args:
        out: root folder of the dataset (created).
        layout: one of "idrid" (both the segmentation and the grading part,
            same photographs, about 70/30 training/testing), "kaggle",
            "messidor" (grades 0-3, .xlsx annotation), "ddr" (segmentation
            and grading, 60/20/20 train/valid/test), "aptos", "e-ophtha",
            "folder" (images/ + masks/<LESION>/) or "folder-classes"
            (healthy/ + lesion/).
        count: number of photographs.
        size: side of the square photographs, or (height, width).
        seed: the same seed writes the same dataset.

    Returns:
        `out`, as a Path.

    Raises:
        RmibError: an unknown layout or a count below 1.
    """
    if layout not in _WRITERS:
        raise RmibError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if int(count) < 1:
        raise RmibError(f"count must be at least 1, got {count}")
    _parse_size(size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _WRITERS[layout](out, int(count), size, seed)
    return out


__all__ = ["LAYOUTS", "MASK_KEYS", "synthesize_fundus", "write_dataset"]
