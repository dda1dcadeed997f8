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

Modules: `scene` (geometry, background, vessels), `lesions`, `photograph`
(`synthesize_fundus`) and `layouts` (`write_dataset`).
"""

from rmib.data.synthetic.layouts import LAYOUTS, MASK_KEYS, write_dataset
from rmib.data.synthetic.photograph import synthesize_fundus

__all__ = ["LAYOUTS", "MASK_KEYS", "synthesize_fundus", "write_dataset"]
