"""Synthetic datasets on disk, in the folder structure of a public dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rmib import choices
from rmib.data.synthetic.photograph import GRADES, synthesize
from rmib.data.synthetic.scene import parse_size
from rmib.errors import RmibError
from rmib.io import atomic_path, atomic_write, write_csv, write_image

LAYOUTS = choices.SYNTHETIC_LAYOUTS
MASK_KEYS = choices.MASK_TYPES


def samples(count, size, seed):
    """Yield (index, sample) with grades balanced over the dataset."""
    rng = np.random.default_rng(seed)
    grades = rng.permutation(np.arange(count) % GRADES)
    seeds = rng.integers(0, 2**31 - 1, count)
    for i in range(count):
        yield i, synthesize(size, int(seeds[i]), int(grades[i]))


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
    for i, sample in samples(count, size, seed):
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
    write_csv(truths / "a. IDRiD_Disease Grading_Training Labels.csv", labels[0], header)
    write_csv(truths / "b. IDRiD_Disease Grading_Testing Labels.csv", labels[1], header)


def _write_kaggle(out, count, size, seed):
    rows = []
    for i, sample in samples(count, size, seed):
        name = f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}"
        write_image(out / "train" / f"{name}.jpeg", sample["image"])
        rows.append((name, sample["grade"]))
    write_csv(out / "trainLabels.csv", rows, ["image", "level"])


def _write_aptos(out, count, size, seed):
    rng = np.random.default_rng([seed, 1])
    rows = []
    for _, sample in samples(count, size, seed):
        id_code = "".join(f"{b:02x}" for b in rng.integers(0, 256, 6))
        write_image(out / "train_images" / f"{id_code}.png", sample["image"])
        rows.append((id_code, sample["grade"]))
    write_csv(out / "train.csv", rows, ["id_code", "diagnosis"])


def _write_messidor(out, count, size, seed):
    import openpyxl

    bases = {}
    for i, sample in samples(count, size, seed):
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
    for i, sample in samples(count, size, seed):
        split = _DDR_SPLITS[splits[i]]
        name = f"2017{i:013d}"
        seg = out / "lesion_segmentation" / split
        write_image(seg / "image" / f"{name}.jpg", sample["image"])
        for lesion in choices.LESIONS:  # DDR has a (possibly empty) label for each
            write_image(seg / "label" / lesion / f"{name}.tif", _binary(sample["masks"][lesion]))
        write_image(out / "DR_grading" / split / f"{name}.jpg", sample["image"])
        lines[split].append(f"{name}.jpg {sample['grade']}\n")
    for split, rows in lines.items():
        with atomic_write(out / "DR_grading" / f"{split}.txt") as f:
            f.writelines(rows)


def _write_eophtha(out, count, size, seed):
    healthy_turn = 0
    for i, sample in samples(count, size, seed):
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
    for i, sample in samples(count, size, seed):
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
    for i, sample in samples(count, size, seed):
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
    parse_size(size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _WRITERS[layout](out, int(count), size, seed)
    return out
