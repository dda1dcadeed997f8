"""`rmib pretrain`: the stage-1 "lesion / healthy" classifier (Ortiz-Feregrino et al.).

A VGG16 or ResNet50 backbone, optionally with CBAM, a head with L2, batch
norm and dropout, and a sigmoid output, trained on fundus photographs cropped
to their field of view, CLAHE-enhanced and resized to 480x480 (binary label:
DR grade > 0). Messidor and Kaggle/EyePACS roots can be given together.
"""

from __future__ import annotations

from pathlib import Path

import click
import keras
import numpy as np

from rmib import metrics, training
from rmib.config import config_to_dict
from rmib.data import readers
from rmib.data.pipeline import (
    PreprocessedCache,
    Preprocessing,
    classification_dataset,
    evaluation_arrays,
    stratified_split,
)
from rmib.errors import RmibError
from rmib.methods.classifier.config import PretrainConfig


def classification_records(data_roots, on_bad="error"):
    """Records with a binary label from every root (grade > 0, or the folder)."""
    if not data_roots:
        raise RmibError("no --data given: name at least one dataset root (Messidor, Kaggle, ...)")
    records, unlabelled = [], []
    for root in data_roots:
        dataset = readers.read_dataset(root, on_bad=on_bad)
        # A tree with a grading part and a segmentation part (IDRiD, DDR) may show
        # the same photographs in both; the grades are the classifier's labels.
        graded = [r for r in dataset.records if r.grade is not None]
        labelled = graded or [r for r in dataset.records if r.label is not None]
        if not labelled:
            unlabelled.append(f"{root} ({dataset.layout})")
        records += labelled
    if unlabelled:
        raise RmibError(
            f"no DR grade or lesion/healthy label in {', '.join(unlabelled)}; "
            "expected a graded dataset (Messidor, Kaggle/EyePACS, APTOS, IDRiD grading, DDR grading)"
        )
    if len({r.label for r in records}) < 2:
        raise RmibError(
            f"all {len(records)} images have label {records[0].label}: "
            "a classifier needs both healthy (grade 0) and lesion (grade > 0) images"
        )
    return records


def run_pretrain(cfg: PretrainConfig, resume=False, echo=click.echo, dry_run=False) -> dict:
    """Train the classifier in `cfg.out`; returns the validation metrics.

    The run directory and the weights are checked before the data is read;
    with `dry_run` the configuration, the data found and the run directory are
    printed and nothing is written (returns {}).
    """
    from rmib.models import build_classifier
    from rmib.models.backbones import check_weights

    training.RunDirectory(cfg.out, create=False).refuse_new_run_over_old(resume)
    check_weights(cfg.backbone, cfg.weights)
    weights = None if cfg.weights in ("", "none") else cfg.weights
    records = classification_records(cfg.data, cfg.on_bad)
    train_records, val_records = stratified_split(records, cfg.val_fraction, seed=cfg.train.seed)
    if dry_run:
        lesion = sum(r.label for r in records)
        found = [
            f"{len(records)} labelled images in {', '.join(map(str, cfg.data))} ({lesion} with "
            f"lesions): {len(train_records)} for training, {len(val_records)} for validation"
        ]
        echo(training.dry_run_report(cfg, found, cfg.out, resume))
        return {}
    run = training.RunDirectory(cfg.out)
    job = training.TrainingJob(run, cfg.train, resume=resume)
    if job.chief:
        run.write_config(config_to_dict(cfg))
    prep = Preprocessing(method=cfg.preprocessing, fov_crop=True, size=cfg.image_size)
    cache = PreprocessedCache(cfg.cache_dir or None)
    train_ds, steps, kept = classification_dataset(
        train_records,
        cfg.image_size,
        job.batch_size,
        preprocessing=prep,
        augment=cfg.augment,
        colour_jitter=cfg.colour_jitter,
        seed=cfg.train.seed,
        start_epoch=job.start_epoch(),
        epochs=cfg.train.epochs,
        cache=cache,
        on_bad=cfg.on_bad,
        problems=job.problems,
    )
    val_images, val_labels, val_kept = evaluation_arrays(
        val_records, cfg.image_size, prep, cache, cfg.on_bad, job.problems
    )
    labels = np.array([r.label for r in kept])
    echo(
        f"{cfg.backbone}{'+CBAM' if cfg.cbam else ''} at {cfg.image_size} px: "
        f"{len(kept)} training images ({int(labels.sum())} with lesions), "
        f"{len(val_kept)} validation images -> {run.path}"
    )
    class_weight = training.class_weights_from_labels(labels) if cfg.train.class_weights else None
    metadata = {
        "task": "pretrain",
        "backbone": cfg.backbone,
        "cbam": cfg.cbam,
        "cbam_init": cfg.cbam_init if cfg.cbam else None,
        "image_size": cfg.image_size,
        "weights": cfg.weights,
        "preprocessing": prep.to_dict(),
        "threshold": cfg.threshold,
    }

    def make_model():
        return build_classifier(
            cfg.backbone,
            cbam=cfg.cbam,
            cbam_init=cfg.cbam_init,
            image_size=cfg.image_size,
            weights=weights,
            dense_units=cfg.dense_units,
            dropout=cfg.dropout,
            l2=cfg.l2,
        )

    model = job.fit(
        make_model,
        train_ds,
        (val_images.astype(np.float32), val_labels.astype(np.float32)[:, None]),
        config=cfg.train,
        metadata=metadata,
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.Precision(name="precision"),
        ],
        steps_per_epoch=steps,
        class_weight=class_weight,
    )

    job.finish()  # skipped.csv; the classifier's validation is the report below
    if job.interrupted:
        return {}  # stopped before its end by a callback: no final model (fit said how to resume)
    prob = model.predict(val_images.astype(np.float32), batch_size=cfg.train.batch_size, verbose=0)
    prob = np.asarray(prob, np.float64).reshape(-1)
    report = metrics.binary_classification_report(val_labels, prob, threshold=cfg.threshold)
    if not job.chief:
        return report  # only the chief of a multi-worker run writes the run directory
    metrics.save_roc_curve(
        val_labels, prob, Path(run.path) / "roc_curve.png", title="Validation ROC"
    )
    run.update_metrics({"validation": report})
    cm = report["confusion_matrix"]
    echo(
        f"validation ({report['n']} images): accuracy {report['accuracy']:.3f}, "
        f"recall {report['recall']:.3f}, precision {report['precision']:.3f}, "
        f"ROC AUC {report['roc_auc']:.3f}\n"
        f"confusion matrix [[TN FP] [FN TP]]: {cm}\n"
        f"ROC curve: {Path(run.path) / 'roc_curve.png'}"
    )
    return report
