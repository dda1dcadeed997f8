"""`idrid_real`: rmib's segmenters on the official IDRiD training portion (issue #14).

The data and the split are fixed for every row (`../shared/data/idrid/README`):

- segmentation: train on 43 of the 54 photographs, validate on the 11 of
  `VAL_NAMES` (every lesion present in representative amounts);
- stage 1: the 395 graded photographs, lesion = grade > 0, minus the graded
  copies of the 11 validation photographs (`duplicates.csv`), as a folder of
  symbolic links in the work directory (healthy/ + lesion/); its validation a
  stratified 20 % (seed 0); `--weights none` (no ImageNet weights offline).

Every row is ONE command line run in a child process with `--time-limit`
(30 minutes for the final rows, `--minutes 10` to screen), `--precision
float32`; then `rmib evaluate` scores the 11 photographs: AP of every pixel
pooled at full resolution (no `--fov-only`), F1 at the threshold 0.5 (no
recipe sets another yet), region F-score at sigma 0.5, and the seconds per
photograph of that evaluation (model loading and preprocessing included).
Row (e), the plain keras-io-style U-Net reference, is trained by this package
(`python -m benchmarks.idrid_real unet ...`) from rmib's building blocks and
saved as an rmib run, so `rmib evaluate` scores it the same way.

Finished rows go into `benchmarks/idrid_real.json` (30-minute rows only;
screening and quick rows into the work directory) and are skipped on
re-runs; models live in `$RMIB_BENCH_WORKDIR`, outside the repository.

    RMIB_BENCH_WORKDIR=/scratch/rmib python -m benchmarks.run --only idrid_real \\
        --out benchmarks/BENCHMARKS.md [--rows EX_a_seed0,EX_e] [--taskset 1] [--minutes 10]
    python -m benchmarks.run --only idrid_real --quick     # idrid-sample, 1 minute a row

Not part of the default `make bench` run (every row is half an hour).

The package: `split` (the photographs and the stage-1 view), `rows` (each row's
command line, the levers), `runner` (runs the rows, `idrid_real` for
`benchmarks.run`), `results` (the json), `render` (the BENCHMARKS.md section),
`unet` (row e's reference U-Net), `frozen_cost` (a frozen encoder's step in
parts) and `cli` (`python -m benchmarks.idrid_real unet | render | frozen-cost`).
"""

from benchmarks.idrid_real.frozen_cost import frozen_encoder_cost
from benchmarks.idrid_real.render import render_idrid_real
from benchmarks.idrid_real.results import (
    RESULTS,
    add_row,
    load_results,
    pending_rows,
    results_path,
    save_results,
)
from benchmarks.idrid_real.rows import (
    DUAL2NET_SIZE,
    FINAL_MINUTES,
    KIND_NAMES,
    LEVERS,
    QUICK_ROWS,
    ROWS,
    STAGE1_KINDS,
    THRESHOLD,
    evaluate_command,
    lever_recipe,
    row_command,
    run_name,
)
from benchmarks.idrid_real.runner import idrid_real, run_row
from benchmarks.idrid_real.split import (
    GRADING_CSV,
    GRADING_IMAGES,
    IDRID,
    IDRID_SAMPLE,
    VAL_NAMES,
    build_stage1_view,
    split_names,
    stage1_exclusions,
)
from benchmarks.idrid_real.unet import UNET, UNET_QUICK, train_reference_unet

__all__ = [
    "DUAL2NET_SIZE",
    "FINAL_MINUTES",
    "GRADING_CSV",
    "GRADING_IMAGES",
    "IDRID",
    "IDRID_SAMPLE",
    "KIND_NAMES",
    "LEVERS",
    "QUICK_ROWS",
    "RESULTS",
    "ROWS",
    "STAGE1_KINDS",
    "THRESHOLD",
    "UNET",
    "UNET_QUICK",
    "VAL_NAMES",
    "add_row",
    "build_stage1_view",
    "evaluate_command",
    "frozen_encoder_cost",
    "idrid_real",
    "lever_recipe",
    "load_results",
    "pending_rows",
    "render_idrid_real",
    "results_path",
    "row_command",
    "run_name",
    "run_row",
    "save_results",
    "split_names",
    "stage1_exclusions",
    "train_reference_unet",
]
