"""Row (e) of idrid_real: the plain keras-io-style U-Net reference, from rmib's blocks.

`python -m benchmarks.idrid_real unet ...` trains it through `rmib.training.fit`
and saves it as an rmib run, so `rmib evaluate` scores it as every other row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The reference U-Net of issue #14, exactly: base width 16, batch norm, BCE + Dice,
# 256-px patches at half resolution, half centred on a lesion pixel, quarter turns
# and flips, batch 8, Adam 1e-3.
UNET = {"depth": 4, "base_filters": 16, "patch_size": 256, "scale": 0.5, "batch_size": 8}
UNET_QUICK = {**UNET, "patch_size": 64, "scale": 0.25, "batch_size": 4}


def train_reference_unet(argv=None) -> None:
    """`python -m benchmarks.idrid_real unet ...`: the plain U-Net reference of row (e)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idrid_real unet")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--lesion", required=True, choices=("EX", "HE", "MA", "SE"))
    parser.add_argument("--val-names", action="append", default=[])
    parser.add_argument("--patch-size", type=int, default=UNET["patch_size"])
    parser.add_argument("--scale", type=float, default=UNET["scale"])
    parser.add_argument("--batch-size", type=int, default=UNET["batch_size"])
    parser.add_argument("--time-limit", type=float, required=True)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    from rmib import losses, training
    from rmib.config import TrainConfig
    from rmib.data.pipeline import (
        Preprocessing,
        load_examples,
        patch_dataset,
        rescale_example,
        split_by_names,
    )
    from rmib.methods.segment_data import lesion_records
    from rmib.models.unet import build_unet

    records = lesion_records([args.data], args.lesion)
    train_records, val_records = split_by_names(records, args.val_names)
    prep = Preprocessing(method="none")
    examples, _ = load_examples(train_records, prep, args.lesion)
    examples = [rescale_example(e, args.scale) for e in examples]
    steps = 50  # per epoch: the time limit, checked after each epoch, ends training
    config = TrainConfig(
        epochs=1000, batch_size=args.batch_size, learning_rate=1e-3, optimizer="adam",
        lr_schedule="constant", monitor="loss", monitor_mode="min", precision=args.precision,
        seed=args.seed, time_limit=args.time_limit,
    )  # fmt: skip
    dataset = patch_dataset(
        examples, args.patch_size, args.batch_size, steps, pos_fraction=0.5, augment="rot90",
        seed=args.seed, start_epoch=0, epochs=config.epochs,
    )  # fmt: skip
    metadata = {
        "task": "segment",
        "model": "encoder-decoder",  # fully convolutional: predicted by TiledSegmenter
        "reference": "plain 4-level U-Net, base width 16, batch norm, BCE + Dice (keras-io)",
        "lesion": args.lesion,
        "preprocessing": prep.to_dict(),
        "patch_size": args.patch_size,
        "scale": args.scale,
        "predict_tile": "auto",
        "predict_halo": 64,
        "predict_max_tile": 1024,
        "size_multiple": 2 ** UNET["depth"],
        "loss": "bce+dice",
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
    }
    training.fit(
        lambda: build_unet(UNET["depth"], UNET["base_filters"], max_filters=1024),
        dataset,
        None,
        config=config,
        run_dir=training.RunDirectory(args.out),
        loss=losses.get_loss("bce+dice"),
        metadata=metadata,
        steps_per_epoch=steps,
    )
