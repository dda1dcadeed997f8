"""Prediction with a trained patch-grid DR grader (Yang et al., MICCAI 2017): `Grader`.

`Grader.load` reads a `rmib grade train` run directory; `grade_prepared`
grades one preprocessed photograph (local net over the grid -> weighted
lesion map -> global net); `predict_images` grades files and draws each one's
lesion map (`rmib grade predict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from rmib import io, report
from rmib.data.pipeline import Preprocessing, preprocess_array
from rmib.errors import RmibError
from rmib.methods.grading.config import PHASES, TASK
from rmib.methods.grading.data import guarded, with_progress
from rmib.methods.grading.grid import grid_positions
from rmib.methods.grading.lesion_map import MAX_WEIGHT, LesionMap, global_input, predict_lesion_map
from rmib.methods.grading.patches import PATCH_CLASSES
from rmib.training import load_model, read_run_metadata

PICTURE_MIN_TILE, PICTURE_MAX_TILE = 256, 512  # panel side in lesion-map pictures
HEAT_COLOUR = (0, 255, 0)  # green stands out on the orange retina


@dataclasses.dataclass
class GradeResult:
    """The grade of one photograph.

    Attributes:
        grade: the predicted grade (argmax of `probs`).
        probs: the global net's class probabilities (K,).
        lesion_map: the local net's `LesionMap` (M, L, P).
        plain_grade, plain_probs: the non-weighted baseline's, when the run has it.
    """

    grade: int
    probs: np.ndarray
    lesion_map: LesionMap
    plain_grade: int | None = None
    plain_probs: np.ndarray | None = None


class Grader:
    """A trained two-stage grader: local net, global net (and baseline) with the run's metadata.

    Args:
        local_net, global_net: the trained Keras models, or their `.keras`
            files (loaded on first use, so a command fails fast on bad data).
        metadata: the run's rmib.json (grid, sizes, grades, preprocessing).
        plain_net: the non-weighted baseline (model or file), or None.
        batch_size: patches per local-net call.
        unsafe: allow Lambda layers when loading the files (trusted files only).
    """

    def __init__(
        self, local_net, global_net, metadata: dict, plain_net=None, batch_size=256, unsafe=False
    ):
        self._models = {"local": local_net, "global": global_net, "global_plain": plain_net}
        self._unsafe = unsafe
        self.metadata = dict(metadata)
        self.image_size = int(metadata["image_size"])
        self.patch_size = int(metadata["patch_size"])
        self.overlap = int(metadata["overlap"])
        self.min_pixels = int(metadata.get("min_pixels", 3))
        self.num_classes = int(metadata["grades"])
        self.global_size = int(metadata["global_size"])
        self.preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        self.batch_size = int(batch_size)

    def _model(self, phase: str):
        model = self._models[phase]
        if isinstance(model, (str, Path)):
            model = self._models[phase] = load_model(model, unsafe=self._unsafe)
        return model

    @property
    def local_net(self):
        return self._model("local")

    @property
    def global_net(self):
        return self._model("global")

    @property
    def plain_net(self):
        return self._model("global_plain")

    @classmethod
    def load(cls, run_dir, batch_size: int = 256, unsafe: bool = False) -> Grader:
        """The grader of a `rmib grade train` run directory (models loaded on first use).

        Raises:
            RmibError: not a run directory, not a grading run, or a model file missing.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RmibError(f"{run_dir}: no such run directory (expected a rmib grade train --out)")
        metadata = read_run_metadata(run_dir)
        if metadata.get("task") != TASK:
            raise RmibError(
                f"{run_dir}: not a grading run (its rmib.json has task "
                f"{metadata.get('task')!r}; expected {TASK!r} from rmib grade train)"
            )
        files = {}
        for phase, file in PHASES.items():
            path = run_dir / file
            if path.is_file():
                files[phase] = path
            elif phase != "global_plain" or metadata.get("baseline"):
                raise RmibError(
                    f"{path}: missing; the run has not finished (continue it with "
                    "rmib grade train --resume)"
                )
        return cls(
            files["local"], files["global"], metadata, files.get("global_plain"), batch_size, unsafe
        )

    def prepare(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model input, display image): the photograph preprocessed, and placed the same
        way without Graham (for pictures)."""
        image, _, _ = preprocess_array(raw, self.preprocessing)
        shown, _, _ = preprocess_array(raw, dataclasses.replace(self.preprocessing, method="none"))
        return image, shown

    def _probs(self, model, x) -> np.ndarray:
        return np.asarray(model.predict_on_batch(x[None].astype(np.float32)), np.float32)[0]

    def grade_prepared(self, image) -> GradeResult:
        """Grade a preprocessed (image_size, image_size, 3) photograph."""
        image = np.asarray(image)
        if image.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(
                f"the grader expects {self.image_size}x{self.image_size} preprocessed images, "
                f"got {image.shape}"
            )
        found = predict_lesion_map(
            self.local_net, image, self.patch_size, self.overlap, self.batch_size
        )
        probs = self._probs(self.global_net, global_input(image, self.global_size, found.weights))
        result = GradeResult(int(probs.argmax()), probs, found)
        if self.plain_net is not None:
            plain = self._probs(self.plain_net, global_input(image, self.global_size))
            result.plain_grade, result.plain_probs = int(plain.argmax()), plain
        return result


def lesion_map_picture(image, found: LesionMap, patch: int, overlap: int) -> np.ndarray:
    """Two panels: the photograph with M as a heat map, and the lesion patches outlined by class.

    The heat is (M - 1) / 3 clipped to [0, 1]: 0 for a sure normal patch
    (weight 1), 1 for a sure exudate (weight 4). Outlines use
    `rmib.report.LESION_COLOURS` (MA cyan, HE red, EX yellow), drawn in
    order of severity so the most severe is on top.
    """
    image = np.asarray(image, np.uint8)
    size = image.shape[0]
    heat = np.clip((found.weights - 1.0) / (MAX_WEIGHT - 1.0), 0.0, 1.0)
    heat_panel = report.probability_overlay(image, heat, colour=HEAT_COLOUR, alpha=0.85)
    boxes = np.ascontiguousarray(image.copy())
    positions = grid_positions(size, patch, overlap)
    # Outlines stay visible after the sheet scales an 800 px image down to 512 px.
    thickness = max(1, round(size / 400))
    for label in range(1, len(PATCH_CLASSES)):
        colour = tuple(int(c) for c in report.LESION_COLOURS[PATCH_CLASSES[label]])
        for i, j in zip(*np.nonzero(found.labels == label), strict=True):
            y, x = positions[i], positions[j]
            cv2.rectangle(boxes, (x, y), (x + patch - 1, y + patch - 1), colour, thickness)
    return report.contact_sheet(
        [[heat_panel, boxes]],
        tile=int(np.clip(size, PICTURE_MIN_TILE, PICTURE_MAX_TILE)),
        labels=["weighted lesion map M", "MA cyan, HE red, EX yellow"],
    )


def predict_images(
    grader: Grader,
    paths,
    out,
    *,
    on_bad: str = "error",
    echo: Callable[[str], None] = print,
    progress=None,
) -> list[dict]:
    """Grade photographs; write predictions.csv and <stem>_lesion_map.png to `out`.

    Returns:
        One row per graded image: image, grade, prob_<g> ..., patch counts,
        (plain_grade with a baseline), map file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    for path, raw in guarded(
        with_progress(progress, list(paths), "Grading"), io.read_image, on_bad, problems
    ):
        image, shown = grader.prepare(raw)
        result = grader.grade_prepared(image)
        picture = out / f"{Path(path).stem}_lesion_map.png"
        io.write_image(
            picture, lesion_map_picture(shown, result.lesion_map, grader.patch_size, grader.overlap)
        )
        counts = np.bincount(result.lesion_map.labels.ravel(), minlength=len(PATCH_CLASSES))
        row = {"image": str(path), "grade": result.grade}
        row.update({f"prob_{g}": round(float(p), 6) for g, p in enumerate(result.probs)})
        row.update({f"patches_{c}": int(counts[k]) for k, c in enumerate(PATCH_CLASSES)})
        if result.plain_grade is not None:
            row["plain_grade"] = result.plain_grade
        row["lesion_map"] = picture.name
        rows.append(row)
        probs = ", ".join(f"{g}: {p:.3f}" for g, p in enumerate(result.probs))
        echo(f"{Path(path).name}: grade {result.grade} ({probs})")
    if problems:
        io.write_skipped(out, problems)
        if not rows:
            raise RmibError(f"no image could be read; see {out / 'skipped.csv'}")
    io.write_csv(out / "predictions.csv", rows)
    return rows
