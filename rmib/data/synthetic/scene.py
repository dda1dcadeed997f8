"""The geometry of a synthetic photograph (field of view, optic disc, fovea), its
background and its vessel tree (with the new vessels of grade 4)."""

from __future__ import annotations

import math

import cv2
import numpy as np


def parse_size(size) -> tuple[int, int]:
    if np.isscalar(size):
        height = width = int(size)
    else:
        height, width = (int(v) for v in size)
    if height < 32 or width < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    return height, width


class Scene:
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


def background(rng, scene) -> np.ndarray:
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


def optic_disc(rng, scene, image) -> np.ndarray:
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


def vessel_segments(rng, scene, grade):
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


def draw_vessels(scene, segments) -> dict:
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


def apply_vessels(rng, image, maps):
    absorb = {
        "vein": np.array([0.42, 0.62, 0.55], np.float32) * rng.uniform(0.9, 1.1),
        "artery": np.array([0.22, 0.48, 0.42], np.float32) * rng.uniform(0.9, 1.1),
        "new": np.array([0.25, 0.55, 0.5], np.float32),
    }
    for kind, coverage in maps.items():
        if coverage.any():
            image *= 1 - coverage[..., None] * absorb[kind]
