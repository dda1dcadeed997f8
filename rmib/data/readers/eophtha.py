"""e-ophtha: e_optha_EX/{EX,healthy}/<patient>/<img>.jpg +
e_optha_EX/Annotation_EX/<patient>/<img>_EX.png; the same with MA."""

from __future__ import annotations

import re

from rmib.data.readers.common import child_dir, image_files, mask_owner, ordered_lesions, subdirs
from rmib.data.records import Record

_EOPHTHA_SET = re.compile(r"^e[\W_]*(optha|ophtha)[\W_]*(ex|ma)$", re.IGNORECASE)


def _eophtha_sets(root) -> list:
    sets = []
    for folder in subdirs(root):
        match = _EOPHTHA_SET.match(folder.name)
        if match:
            sets.append((match.group(2).upper(), folder))
    return sets


def find_parts(root):
    return ["e-ophtha"] if _eophtha_sets(root) else []


def read(root, parts, bad):
    records, codes = [], []
    for code, folder in _eophtha_sets(root):
        codes.append(code)
        lesion_dir = child_dir(folder, code)
        annotation_dir = child_dir(folder, f"Annotation_{code}", f"Annotations_{code}")
        healthy_dir = child_dir(folder, "healthy")
        annotations = {}
        for mask in image_files(annotation_dir, recursive=True):
            key = (mask.parent.relative_to(annotation_dir), mask_owner(mask, code).lower())
            annotations.setdefault(key, mask)
        used = set()
        for image in image_files(lesion_dir, recursive=True):
            key = (image.parent.relative_to(lesion_dir), image.stem.lower())
            mask = annotations.get(key)
            if mask is None:
                expected = (annotation_dir or folder / f"Annotation_{code}") / key[0]
                bad(image, f"no {code} annotation: expected {expected}/{image.stem}_{code}.png")
                continue
            used.add(key)
            records.append(Record(image=image, name=image.stem, label=1, masks={code: mask}))
        for key, mask in sorted(annotations.items(), key=lambda kv: str(kv[1])):
            if key not in used:
                expected = (lesion_dir or folder / code) / key[0]
                bad(mask, f"annotation without an image: expected {expected}/{key[1]}.jpg")
        for image in image_files(healthy_dir, recursive=True):
            records.append(Record(image=image, name=image.stem, label=0, masks={code: None}))
    return records, ordered_lesions(codes)
