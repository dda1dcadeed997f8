"""One synthetic photograph: the scene, the vessels and the lesions of a grade, then
the camera (optics blur, field-of-view edge, sensor noise)."""

from __future__ import annotations

import cv2
import numpy as np

from rmib.data.synthetic.lesions import paint_lesions
from rmib.data.synthetic.scene import (
    Scene,
    apply_vessels,
    background,
    draw_vessels,
    optic_disc,
    parse_size,
    vessel_segments,
)

GRADES = 5


def synthesize(size, seed, grade=None) -> dict:
    height, width = parse_size(size)
    rng = np.random.default_rng(seed)
    if grade is None:
        grade = int(rng.integers(0, GRADES))
    if grade not in range(GRADES):
        raise ValueError(f"grade must be 0-4, got {grade}")
    scene = Scene(rng, height, width)
    image = background(rng, scene)
    od = optic_disc(rng, scene, image)
    apply_vessels(rng, image, draw_vessels(scene, vessel_segments(rng, scene, grade)))
    lesions = paint_lesions(rng, scene, image, grade)

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
    sample = synthesize(size, seed, grade)
    return sample["image"], sample["masks"], sample["grade"]
