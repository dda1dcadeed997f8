"""Plain records every reader returns, whatever the dataset layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Record:
    """One photograph of a dataset.

    Attributes:
        image: path of the photograph.
        name: identifier within the dataset (file stem, e.g. "IDRiD_01").
        grade: DR grade 0-4 when the dataset grades it, else None.
        label: binary "has a lesion" label (grade > 0, or any lesion mask
            non-empty for segmentation sets, or the folder for the plain
            layout), else None.
        masks: lesion code ("EX", "HE", "MA", "SE", "OD") -> mask path, for
            every lesion type the dataset annotates on this image. A value of
            None means "annotated, and absent from this image" (IDRiD has no
            file for a lesion an image does not show): an all-zero mask.
            A lesion type missing from the dict is unknown for this image.
        split: the dataset's own split ("train", "valid", "test"), when it has one.
    """

    image: Path
    name: str
    grade: int | None = None
    label: int | None = None
    masks: dict = dataclasses.field(default_factory=dict)
    split: str | None = None

    def has_mask(self, lesion: str) -> bool:
        """True when the dataset annotates `lesion` on this image (possibly as empty)."""
        return lesion in self.masks


@dataclasses.dataclass
class Dataset:
    """The records of one dataset tree, and which layout they were read from.

    Attributes:
        layout: reader name ("messidor", "kaggle", "aptos", "idrid-segmentation",
            "idrid-grading", "e-ophtha", "ddr-segmentation", "ddr-grading",
            "folder-classes", "folder-masks"), or the family name ("idrid",
            "ddr", "folder") when one tree holds both of its parts.
        root: the folder that was read.
        records: one Record per photograph.
        lesions: the lesion types this layout annotates with masks.
        problems: (path, reason) for every file the reader had to skip
            (only filled with on_bad="skip").
    """

    layout: str
    root: Path
    records: list
    lesions: tuple = ()
    problems: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.records)

    @property
    def graded(self) -> bool:
        return any(r.grade is not None for r in self.records)

    def with_lesion(self, lesion: str) -> list:
        """Records annotated for `lesion` (including those where it is absent)."""
        return [r for r in self.records if r.has_mask(lesion)]
