"""`make demo`: the main job end to end on the built-in synthetic fundus dataset.

Run as `python -m rmib.demo --out demo-output`. Every number it prints is
computed on the data it just synthesised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _step(title):
    print(f"\n=== {title} ===", flush=True)


def contact_sheet(dataset, out_path, count=4):
    """Raw and preprocessed photographs with their lesion masks, one row each."""
    from rmib import io, report
    from rmib.data import fundus

    rows = []
    records = [r for r in dataset.records if r.masks][:count]
    for record in records:
        image = io.read_image(record.image)
        masks = {
            lesion: (io.read_mask(path, image.shape[:2]) if path is not None else None)
            for lesion, path in record.masks.items()
            if lesion != "OD"
        }
        cropped, box = fundus.fov_crop(image)
        rows.append(
            [
                image,
                fundus.clahe(cropped),
                fundus.graham(cropped),
                report.masks_overlay(image, masks),
            ]
        )
    sheet = report.contact_sheet(
        rows, tile=256, labels=["raw", "FOV crop + CLAHE", "Graham", "lesion masks"]
    )
    io.write_image(out_path, sheet)
    return out_path


def run_main_job(data_root, out, args, stage1_root=None):
    """Pretrain a VGG16-CBAM classifier, segment exudates with its frozen encoder,
    predict a full-size photograph, evaluate; returns the summary lines.

    As in the paper, stage 1 learns "lesion / healthy" on a graded dataset
    (`stage1_root`, Kaggle layout; `data_root` when None) and stage 2 segments on
    the IDRiD-layout dataset with lesion masks."""
    import shutil

    from rmib import io
    from rmib.config import load_config
    from rmib.data import synthetic
    from rmib.methods.classifier.config import PretrainConfig
    from rmib.methods.segment_config import SegmentConfig
    from rmib.predict import evaluate_dataset, predict_files
    from rmib.tasks import load_segmenter, run_pretrain, run_segment

    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # the demo always starts afresh

    _step("4. Pretrain a VGG16-CBAM lesion / healthy classifier (stage 1)")
    pre_cfg = load_config(
        PretrainConfig,
        None,
        {
            "data": [str(stage1_root or data_root)],
            "backbone": "vgg16",
            "cbam": True,
            "image_size": 96,
            "val_fraction": 0.25,
            "out": str(runs / "pretrain"),
            "train.epochs": args.epochs,
            "train.batch_size": 4,
            "train.learning_rate": 5e-4,
            "train.seed": args.seed,
        },
    )
    pre = run_pretrain(pre_cfg)

    _step("5. Segment hard exudates with the frozen stage-1 encoder (stage 2)")
    seg_cfg = load_config(
        SegmentConfig,
        None,
        {
            "data": [str(data_root)],
            "lesion": "EX",
            "encoder": str(runs / "pretrain"),
            "patch_size": 64,
            "patches_per_epoch": 192,
            "predict_tile": 128,
            "val_fraction": 0.2,
            "out": str(runs / "segment-ex"),
            "train.epochs": args.epochs,
            "train.batch_size": 8,
            "train.seed": args.seed,
        },
    )
    seg = run_segment(seg_cfg)

    _step("6. Predict a full-size synthetic photograph by overlapping tiles")
    photo, masks, grade = synthetic.synthesize_fundus(1024, seed=10_000 + args.seed, grade=3)
    photo_path = out / "photo" / "synthetic_photo.png"
    io.write_image(photo_path, photo)
    segmenter = load_segmenter(runs / "segment-ex", precision="float32")
    print("predicting in float32 (rmib predict's default, whatever the training precision)")
    predict_files(segmenter, [photo_path], out / "predictions")
    print(f"wrote {out / 'predictions'}/synthetic_photo_{{prob,mask,overlay}}.png")

    _step("7. Evaluate on the held-out test split (AUPR, F1, region F-score, overlays)")
    ev = evaluate_dataset(segmenter, [data_root], out / "evaluation", split="test")
    region = ev["region_f_score"]["0.5"]

    _step("8. Export a SavedModel and check it against the Keras model")
    from rmib.tasks import export_model

    exported = export_model(runs / "segment-ex", out / "export" / "segment-ex", check=True)
    worst = max(exported.differences.values()) if exported.differences else float("nan")
    print(f"wrote {exported.path} (signatures: {', '.join(exported.signatures)})")
    print(
        f"it computes in {exported.precision}; max abs difference {worst:.2e} from rmib's own "
        f"prediction in {exported.precision} (tolerance {exported.tolerance:g})"
    )

    return [
        f"stage 1  VGG16-CBAM classifier on {pre['n']} validation photographs: "
        f"accuracy {pre['accuracy']:.3f}, ROC AUC {pre['roc_auc']:.3f}  ({runs / 'pretrain'})",
        f"stage 2  EX segmenter on the frozen encoder: validation AUPR {seg.get('aupr', float('nan')):.3f}"
        f"  ({runs / 'segment-ex'})",
        f"evaluate {ev['images']} test images: AUPR {ev['aupr']:.3f}, F1 {ev['f1']:.3f}, "
        f"IoU {ev['iou']:.3f}, region F (sigma 0.5) {region:.3f}  ({out / 'evaluation'})",
        f"predict  {out / 'predictions'} (probability map, mask, overlay)",
        f"export   {exported.path}: {exported.precision} SavedModel reloaded, max abs "
        f"difference {worst:.2e} (tolerance {exported.tolerance:g})",
        f"contact sheet  {out / 'contact_sheet.png'}",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--stage1-count", type=int, default=48)
    parser.add_argument("--stage1-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="only synthesise, inspect and draw the contact sheet"
    )
    args = parser.parse_args(argv)
    start = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from rmib.data import readers, synthetic

    _step("1. Synthesise fundus photographs (IDRiD layout, with exact lesion masks)")
    data_root = synthetic.write_dataset(
        out / "data" / "idrid", "idrid", args.count, args.size, args.seed
    )
    dataset = readers.read_dataset(data_root)
    print(f"{data_root}: layout {dataset.layout}, {len(dataset)} records")

    stage1_root = synthetic.write_dataset(
        out / "data" / "kaggle", "kaggle", args.stage1_count, args.stage1_size, args.seed + 1
    )
    print(f"{stage1_root}: layout kaggle, {args.stage1_count} graded photographs for stage 1")

    _step("2. Inspect it")
    from click.testing import CliRunner

    from rmib.cli import cli

    for root in (data_root, stage1_root):
        result = CliRunner().invoke(cli, ["data", "inspect", str(root)])
        print(result.output.rstrip())
        if result.exit_code != 0:
            print(f"inspect failed: {root}", file=sys.stderr)
            return 1

    _step("3. Contact sheet of raw and preprocessed photographs with their masks")
    sheet = contact_sheet(dataset, out / "contact_sheet.png")
    print(f"wrote {sheet}")
    if args.quick:
        print(f"\nDone in {time.time() - start:.0f} s. Outputs under {out}/")
        return 0

    summary = run_main_job(data_root, out, args, stage1_root)
    print("\n=== Summary ===")
    for line in summary:
        print(line)
    print(f"\nDone in {time.time() - start:.0f} s. Outputs under {out}/")
    return 0


def _main_one_line(argv=None) -> int:
    """`main`, with rmib's own errors as one line on stderr (exit 1), as the CLI does."""
    from rmib.errors import RmibError

    try:
        return main(argv)
    except RmibError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main_one_line())
