"""Training: the one runner (`fit`), the one run orchestration (`TrainingJob`) and their parts.

    runner.py       fit: precision, strategy, seed, compile, resume, train, final model
    distributed.py  fit's loop under MultiWorkerMirroredStrategy (strategy.run)
    local_cluster.py  a multi-worker cluster on 127.0.0.1 (its TF_CONFIGs, its processes)
    devices.py      precision (training and prediction) and distribution strategies
    run_dir.py      the run directory, metadata inside .keras files, loading models
    optimizers.py   make_optimizer: FusedAdam (one kernel per variable), coupled weight decay
    callbacks.py    learning-rate schedules, checkpoints, early stopping, time limit
    job.py          TrainingJob: what every method's train() shares (data, resume,
                    validation, time limit over phases, final model, skipped.csv)

The names below are those other modules use as `rmib.training.X`.
"""

from rmib.training.callbacks import current_learning_rate, schedule_callbacks
from rmib.training.devices import (
    apply_precision,
    cpu_supports_bfloat16,
    distribute_dataset,
    get_strategy,
    global_batch_size,
    is_chief,
    precision_reason,
    resolve_precision,
    visible_gpus,
)
from rmib.training.job import TrainingJob
from rmib.training.optimizers import (
    CoupledDecayAdam,
    CoupledDecaySGD,
    FusedAdam,
    make_optimizer,
)
from rmib.training.run_dir import (
    RunDirectory,
    attach_metadata,
    checkpoint_state,
    dry_run_report,
    load_model,
    model_metadata,
    read_run_metadata,
    worker_run_directory,
)
from rmib.training.runner import class_weights_from_labels, fit, run_finished, set_seed

__all__ = [
    "CoupledDecayAdam",
    "CoupledDecaySGD",
    "FusedAdam",
    "RunDirectory",
    "TrainingJob",
    "apply_precision",
    "attach_metadata",
    "checkpoint_state",
    "class_weights_from_labels",
    "cpu_supports_bfloat16",
    "current_learning_rate",
    "distribute_dataset",
    "dry_run_report",
    "fit",
    "get_strategy",
    "global_batch_size",
    "is_chief",
    "load_model",
    "make_optimizer",
    "model_metadata",
    "precision_reason",
    "read_run_metadata",
    "resolve_precision",
    "run_finished",
    "schedule_callbacks",
    "set_seed",
    "visible_gpus",
    "worker_run_directory",
]
