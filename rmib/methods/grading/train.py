"""Training of the patch-grid DR grader (Yang et al., MICCAI 2017): `train_grader`.

"Lesion detection and grading of diabetic retinopathy via two-stage deep
convolutional neural networks": a local network labels the patches of an
overlapping grid (normal, MA, haemorrhage, exudate); the labels and their
probabilities form the weighting matrix M (`lesion_map.weighted_lesion_map`);
a global network grades I* = (M / 4) * I resized to 256 px. This module wires
the building blocks of `rmib.methods.grading` to datasets, the training job
(`rmib.training.TrainingJob`: the runner `rmib.training.fit`, one time limit for
the whole run) and the run directory.

A grading run directory holds, besides the runner's files (config.toml,
rmib.json, history_<phase>.csv, checkpoints/, metrics.json):

    local_net.keras         the patch classifier (phase "local")
    global_net.keras        the grader of the weighted lesion map I* (phase "global")
    global_net_plain.keras  the same network trained on the plain Graham image
                            (phase "global_plain", the paper's non-weighted baseline)
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from rmib import io
from rmib.config import TrainConfig
from rmib.data.pipeline import stratified_split
from rmib.errors import RmibError
from rmib.methods.grading.config import PHASES, GradeConfig, grade_metadata
from rmib.methods.grading.data import (
    array_dataset,
    balanced_class_weights,
    build_global_arrays,
    build_patch_set,
    no_grades_error,
    no_masks_error,
    read_grading_data,
)
from rmib.methods.grading.nets import build_grading_global_net, build_grading_local_net
from rmib.methods.grading.patches import PATCH_CLASSES
from rmib.models.backbones import check_weights
from rmib.training import (
    RunDirectory,
    TrainingJob,
    checkpoint_state,
    dry_run_report,
    global_batch_size,
    load_model,
    run_finished,
)

_WORK = "work"  # scratch arrays of a training run (removed when it finishes)
# What a run holds when the time limit ends it in a phase: each phase keeps its own
# file and there is no model.keras (the training job's default note would say there is).
_STOP_NOTES = {
    "local": f"{PHASES['local']} holds the local net so far, and there is no grader "
    "until phase global has trained",
    "global": f"{PHASES['local']} and {PHASES['global']} make the grader; the baseline waits",
}


def _without_validation(train_cfg: TrainConfig) -> TrainConfig:
    """No validation data: monitor the training counterpart of a `val_` quantity."""
    if train_cfg.monitor.startswith("val_"):
        return dataclasses.replace(train_cfg, monitor=train_cfg.monitor[len("val_") :])
    return train_cfg


def _split(records, fraction: float, seed: int, key):
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    return stratified_split(records, fraction, seed=seed, key=key)


def _refuse_existing(run: RunDirectory) -> None:
    for phase, file in PHASES.items():
        for path in (run.path / file, run.checkpoint_path("last", phase)):
            if path.exists():
                raise RmibError(
                    f"{run.path} already holds a grading run ({path.relative_to(run.path)} "
                    "exists); continue it with --resume, or choose another output directory"
                )


def _weights_arg(weights: str):
    return None if weights.strip().lower() in ("", "none") else weights


def _grade_counts(grades, num_classes) -> dict[str, int]:
    found = np.bincount(np.asarray(grades, np.int64), minlength=num_classes)
    return {str(g): int(found[g]) for g in range(num_classes)}


def _one_line_counts(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


class _Training:
    """The state one `train_grader` call shares between its phases."""

    def __init__(self, cfg, run, resume, echo, progress, verbose):
        self.cfg, self.run, self.resume = cfg, run, resume
        self.echo, self.progress, self.verbose = echo, progress, verbose
        self.metadata = {**grade_metadata(cfg), "data": [str(p) for p in cfg.data]}
        self.work = run.path / _WORK
        self.problems: list = []
        self.summary: dict = {}
        # The phases share one clock: `[train] time_limit` is the whole run's.
        phases = [phase for phase in PHASES if phase != "global_plain" or cfg.baseline]
        self.job = TrainingJob(
            run, cfg.train, resume=resume, phases=phases, stop_notes=_STOP_NOTES, verbose=verbose
        )

    def phase_config(self, phase: str) -> TrainConfig:
        """The TrainConfig of `phase`, with the run's time limit."""
        train_cfg = self.cfg.local_train if phase == "local" else self.cfg.train
        return dataclasses.replace(train_cfg, time_limit=self.cfg.train.time_limit)

    def done(self, phase: str) -> bool:
        """With --resume, a phase whose .keras file exists and that has nothing left to train
        (a phase the time limit stopped goes on under a longer limit)."""
        if not (self.resume and (self.run.path / PHASES[phase]).is_file()):
            return False
        state = checkpoint_state(self.job.own_run, phase)
        return not state or run_finished(state, self.phase_config(phase))

    def load(self, phase: str):
        """The finished `phase`'s model, from its .keras file."""
        self.echo(f"phase {phase}: {PHASES[phase]} exists, done")
        model = load_model(self.run.path / PHASES[phase])
        self.job.loaded(phase, model)
        return model

    def fit_phase(self, phase, build, train, val, augment, class_weight):
        """Train one phase through the training job and save <phase file>.keras.

        Returns:
            The trained model; None when the run's time limit was spent before
            the phase (nothing trained, no file saved).
        """
        train_cfg = self.phase_config(phase)
        if val is None:
            train_cfg = _without_validation(train_cfg)
        batch = global_batch_size(train_cfg)  # --batch-size is per replica
        train_ds, steps = array_dataset(
            *train,
            batch,
            augment=augment,
            seed=train_cfg.seed,
            start_epoch=self.job.start_epoch(phase),
            epochs=train_cfg.epochs,
        )
        val_ds = None
        if val is not None:
            val_ds, _ = array_dataset(*val, batch, shuffle=False)
        model = self.job.fit(
            build,
            train_ds,
            val_ds,
            # The runner's own class weights are binary; these are the 4- or 5-class ones.
            config=dataclasses.replace(train_cfg, class_weights=False),
            metadata=self.metadata,
            phase=phase,
            loss="sparse_categorical_crossentropy",
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            steps_per_epoch=steps,
            class_weight=class_weight if train_cfg.class_weights else None,
            save_final=False,  # each phase has its own file, and no model.keras
        )
        if self.job.phase != phase:  # the time limit was spent: the phase waits
            return None
        self.run.save_model(model, self.run.path / PHASES[phase], self.run.read_metadata())
        return model

    def local(self, records):
        """Phase "local": the patch classifier on mask-labelled patches."""
        cfg = self.cfg
        if self.done("local"):
            return self.load("local")
        seed = cfg.local_train.seed
        train_records, val_records = _split(records, cfg.val_fraction, seed, key=lambda r: r.label)
        sets = {}
        for name, chosen in (("train", train_records), ("val", val_records)):
            sets[name] = build_patch_set(
                chosen,
                cfg,
                self.work / f"patches_{name}.npy",
                seed=seed,
                on_bad=cfg.on_bad,
                problems=self.problems,
                progress=self.progress,
                label=f"Patches ({name})",
            )
        train, val = sets["train"], sets["val"]
        if train is None or not len(train.labels):
            raise RmibError("none of the training images with lesion masks could be read")
        if not np.any(train.labels > 0):
            raise RmibError(
                f"the {train.source_images} training images with masks give no lesion patch: "
                f"no {cfg.patch_size}x{cfg.patch_size} patch holds {cfg.min_pixels} or more MA, "
                f"HE or EX pixels at {cfg.image_size} px; lower --min-pixels or check the masks"
            )
        if val is not None and not len(val.labels):
            val = None
        self.summary["patches"] = {
            name: {
                **s.counts(),
                "images": s.source_images,
                "soft_exudate_only_left_out": s.excluded,
            }
            for name, s in sets.items()
            if s is not None
        }
        self.echo(
            f"phase local: {len(train.labels)} training patches ({_one_line_counts(train.counts())})"
            f" from {train.source_images} images, {train.excluded} SE-only patches left out"
            + (f"; {len(val.labels)} validation patches" if val is not None else "")
        )
        return self.fit_phase(
            "local",
            lambda: build_grading_local_net(cfg.patch_size, len(PATCH_CLASSES), cfg.dropout),
            (train.images, train.labels),
            (val.images, val.labels) if val is not None else None,
            cfg.local_augment,
            balanced_class_weights(train.labels, len(PATCH_CLASSES)),
        )

    def global_phases(self, records, local_net) -> None:
        """Phases "global" (on I*) and "global_plain" (on the Graham image, the baseline)."""
        cfg = self.cfg
        phases = {"global": "weighted"} | ({"global_plain": "plain"} if cfg.baseline else {})
        todo = {}
        for phase, kind in phases.items():
            if not self.job.running:  # the time limit ended the run in an earlier phase
                return
            if self.done(phase):
                self.load(phase)
            else:
                todo[phase] = kind
        if not todo:
            return
        train_records, val_records = _split(
            records, cfg.val_fraction, cfg.train.seed, key=lambda r: r.grade
        )
        arrays = {}
        for name, chosen in (("train", train_records), ("val", val_records)):
            weighted, plain, grades = build_global_arrays(
                chosen,
                local_net,
                cfg,
                self.work,
                name,
                on_bad=cfg.on_bad,
                problems=self.problems,
                progress=self.progress,
            )
            if len(grades):
                arrays[name] = {"weighted": weighted, "plain": plain, "grades": grades}
        if "train" not in arrays:
            raise RmibError(
                f"none of the {len(train_records)} graded training images could be read"
            )
        self.summary["grades"] = {
            name: _grade_counts(a["grades"], cfg.num_classes) for name, a in arrays.items()
        }
        self.echo(
            f"global nets: {len(arrays['train']['grades'])} training images (grades "
            f"{_one_line_counts(self.summary['grades']['train'])})"
            + (f"; {len(arrays['val']['grades'])} validation images" if "val" in arrays else "")
        )
        weights = balanced_class_weights(arrays["train"]["grades"], cfg.num_classes)
        for phase, kind in todo.items():
            if not self.job.running:
                break
            what = (
                "the weighted lesion map I* = (M/4) * I"
                if kind == "weighted"
                else "the plain Graham image"
            )
            self.echo(f"phase {phase}: global net ({cfg.global_net}) on {what}")
            val = arrays.get("val")
            self.fit_phase(
                phase,
                lambda: build_grading_global_net(
                    cfg.global_size,
                    cfg.num_classes,
                    cfg.global_net,
                    cfg.dropout,
                    _weights_arg(cfg.global_weights),
                ),
                (arrays["train"][kind], arrays["train"]["grades"]),
                (val[kind], val["grades"]) if val else None,
                cfg.augment,
                weights,
            )


def train_grader(
    cfg: GradeConfig,
    run_dir,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    progress=None,
    verbose=None,
    dry_run: bool = False,
) -> dict:
    """Train the local net, then the global net on weighted lesion maps (and the plain baseline).

    Phases (each with its own history_<phase>.csv and checkpoints): "local"
    (patches labelled from MA/HE/EX masks), "global" (I* = (M / 4) * I of the
    graded images, M from the trained local net) and, with `cfg.baseline`,
    "global_plain" (the Graham image itself). Each saves its `.keras` file
    (`PHASES`) when done. `cfg.train.time_limit` is the whole run's: when it
    ends the run in a phase, that phase's file is saved and the later phases
    wait for a resume with a longer limit.

    Args:
        cfg: the GradeConfig (its `data` lists the dataset roots).
        run_dir: the run directory (created).
        resume: continue an interrupted run; a phase whose `.keras` file
            exists is done and is loaded instead of trained (unless the time
            limit stopped it and the limit is now longer).
        echo: where progress messages go.
        progress: optional wrapper `progress(items, label) -> items` (a progress bar).
        verbose: Keras verbosity of `fit`; None: `rmib.console.training_verbosity`.
        dry_run: print the configuration, the data found and the run
            directory, write nothing and return {}.

    Returns:
        What the run trained on (also merged into metrics.json under "data").

    Raises:
        RmibError: no data, no image with MA/HE/EX masks, no graded image, no
            lesion patch, an existing run without `resume`, and the runner's errors.
    """
    roots = [Path(p) for p in cfg.data]
    if not resume:
        _refuse_existing(RunDirectory(run_dir, create=False))
    if cfg.global_net != "yang":
        check_weights(cfg.global_net, cfg.global_weights)
    data = read_grading_data(
        roots, cfg.num_classes, exclude_split=cfg.holdout_split, on_bad=cfg.on_bad
    )
    if not data.masked:
        raise no_masks_error(roots, data, cfg.holdout_split)
    if not data.graded:
        raise no_grades_error(roots, data, cfg.num_classes)
    if dry_run:
        found = [
            f"{len(data.masked)} images with MA/HE/EX masks (the local net's patches), "
            f"{len(data.graded)} graded images (the global net) in {', '.join(map(str, roots))}"
        ]
        echo(dry_run_report(cfg, found, run_dir, resume))
        return {}
    run = RunDirectory(run_dir)
    run.write_config(cfg)
    training = _Training(cfg, run, resume, echo, progress, verbose)
    run.write_metadata(training.metadata)
    training.problems += data.problems
    training.summary.update(
        masked_images=len(data.masked),
        graded_images=len(data.graded),
        left_out_grades=data.left_out_grades,
        held_out_split_images=data.held_out,
    )
    notes = [f"{len(data.masked)} images with MA/HE/EX masks, {len(data.graded)} graded images"]
    if data.left_out_grades:
        notes.append(f"{data.left_out_grades} of grade >= {cfg.num_classes} left out")
    if data.held_out:
        notes.append(f"{data.held_out} images of split {cfg.holdout_split!r} held out")
    echo("; ".join(notes))
    local_net = training.local(data.masked)
    if training.job.running:
        training.global_phases(data.graded, local_net)
    shutil.rmtree(training.work, ignore_errors=True)
    if training.problems:
        io.write_skipped(run.path, training.problems)
        training.summary["skipped_files"] = len(training.problems)
    run.update_metrics({"data": training.summary})
    return training.summary
