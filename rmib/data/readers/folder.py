"""The generic layouts: folder-classes (healthy/* + lesion/*) and folder-masks
(images/* + masks/<LESION>/<image stem>.<any image ext>)."""

from __future__ import annotations

from rmib.choices import LESIONS
from rmib.data.readers.common import (
    ImageIndex,
    child_dir,
    image_files,
    mask_code,
    masks_for_split,
    ordered_lesions,
    subdirs,
)
from rmib.data.records import Record


def find_parts(root):
    parts = []
    if child_dir(root, "healthy") and child_dir(root, "lesion"):
        parts.append("folder-classes")
    if child_dir(root, "images") and child_dir(root, "masks"):
        parts.append("folder-masks")
    return parts


def read(root, parts, bad):
    records, lesions = [], ()
    if "folder-classes" in parts:
        for label, name in ((0, "healthy"), (1, "lesion")):
            for image in image_files(child_dir(root, name), recursive=True):
                records.append(Record(image=image, name=image.stem, label=label))
    if "folder-masks" in parts:
        mask_root = child_dir(root, "masks")
        lesions = ordered_lesions(mask_code(d.name) for d in subdirs(mask_root))
        images = ImageIndex(child_dir(root, "images"))
        found = masks_for_split(images, mask_root, lesions, bad)
        for path in images.paths:
            masks = {code: found[path].get(code) for code in lesions}
            label = int(any(masks.get(c) is not None for c in LESIONS))
            records.append(Record(image=path, name=path.stem, label=label, masks=masks))
    return records, lesions
