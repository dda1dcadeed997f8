"""Dataset readers: one module per layout on disk, each returning a `Dataset` of `Record`s.

Readers only list files and read label tables; they never decode an image, so
reading the 35,126 photographs of Kaggle/EyePACS takes seconds.
`check_dataset` and `summarize_dataset` decode (or header-read) every file.

Layouts (folder and header names are matched case-insensitively, ignoring
extra spaces and underscores; hidden files and `__MACOSX` are ignored):

    messidor            any folder (recursively) with Annotation_Base*.xls|.xlsx|.csv
                        ("Image name", "Retinopathy grade" 0-3) beside its .tif images
    kaggle              trainLabels.csv (image, level 0-4) + train/<image>.jpeg
    aptos               train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png
    idrid-segmentation  A. Segmentation/1. Original Images/<split>/IDRiD_NN.jpg +
                        A. Segmentation/2. All Segmentation Groundtruths/<split>/
                        <n. Lesion name>/IDRiD_NN_<CODE>.tif (no file = lesion absent)
    idrid-grading       B. Disease Grading/1. Original Images/<split>/IDRiD_NNN.jpg +
                        B. Disease Grading/2. Groundtruths/<...Training|Testing Labels>.csv
    e-ophtha            e_optha_EX/{EX,healthy}/<patient>/<img>.jpg +
                        e_optha_EX/Annotation_EX/<patient>/<img>_EX.png; same with MA
    ddr-segmentation    lesion_segmentation/<split>/image/<name>.jpg +
                        lesion_segmentation/<split>/label/{EX,HE,MA,SE}/<name>.tif
    ddr-grading         DR_grading/<split>/<name>.jpg + DR_grading/<split>.txt
                        ("<file> <grade>" per line; grade 5 = ungradable, left out)
    folder-classes      healthy/* + lesion/*
    folder-masks        images/* + masks/<LESION>/<image stem>.<any image ext>

"idrid", "ddr" and "folder" name the family: a tree holding both parts of it
reads as one Dataset with that layout name.

Modules: `dataset` (`read_dataset`, `detect_layout`, the table of families),
`checks` (`check_dataset`, `summarize_dataset`, `require_lesion_pixels`),
`common` (bad entries, listings, name matching), `tables` (label tables), and
one per layout family: `messidor`, `kaggle` (and APTOS), `idrid`, `eophtha`,
`ddr`, `folder` (folder-classes, folder-masks), each with `find_parts(root)`
(the parts of the family the folder holds) and `read(root, parts, bad)`
(records and annotated lesion types).
"""

from rmib.choices import MASK_TYPES
from rmib.choices import ON_BAD as ON_BAD_CHOICES
from rmib.data.readers.checks import check_dataset, require_lesion_pixels, summarize_dataset
from rmib.data.readers.dataset import LAYOUTS, detect_layout, read_dataset

__all__ = [
    "LAYOUTS",
    "MASK_TYPES",
    "ON_BAD_CHOICES",
    "check_dataset",
    "detect_layout",
    "read_dataset",
    "require_lesion_pixels",
    "summarize_dataset",
]
