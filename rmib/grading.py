"""The public building blocks of the patch-grid DR grader (Yang et al., MICCAI 2017).

The grader lives in `rmib.methods.grading`; this module keeps its documented
names where they were: `rmib.grading.grid_positions` and
`rmib.grading.weighted_lesion_map`.
"""

from rmib.methods.grading.grid import grid_positions
from rmib.methods.grading.lesion_map import weighted_lesion_map

__all__ = ["grid_positions", "weighted_lesion_map"]
