"""`local_global_prediction`: the fused local-global U-Net (Yan et al. 2019) on a whole photograph.

Seconds per IDRiD-sized photograph (4288 x 2848) for the fused model against
LocalNet alone, through `rmib.methods.local_global.segmenter.LocalGlobalSegmenter` as
`rmib predict` runs them, in each precision of the run, with the FLOPs each
one does and their % of the machine's peak. Issue #5's target: the fused
model costs at most `TARGET_OVERHEAD` (1.3) times LocalNet, which needs
GlobalNet to run once per photograph, not once per tile (counted here).

The two segmenters of a precision are built together and predict the
photograph in turns (LocalNet, fused, LocalNet, fused ...), so a change in
the machine's load hits both alike and their ratio holds. FLOPs
(`benchmarks.flops.model_flops`): LocalNet alone = tiles x (its trunk + 1x1
head); fused = tiles x (LocalNet's trunk + the fusion head) + GlobalNet's
trunk x its passes (the crop to each tile's box is bilinear resampling, not
counted). A second table gives the same FLOP ratio for the paper's default
depths of every lesion at the paper's sizes.

    python -m benchmarks.run --only local_global_prediction --out benchmarks/BENCHMARKS.md
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import (
    NOISE_NOTE,
    fmt,
    load_average,
    peak_for,
    peak_line,
    percent,
    photograph,
    run_line,
    table,
)

LESIONS = ("EX", "HE", "SE", "MA")
TIMED_LESION = "EX"  # GlobalNet depth 6, LocalNet depth 3: the most GlobalNet per tile
TARGET_OVERHEAD = 1.3
# The paper's sizes (GlobalNet 640 x 640, LocalNet 256-px patches; base width 32
# doubling to 512 is rmib's choice) and the segment recipes' prediction settings.
PAPER_SIZES = {"global_size": 640, "patch_size": 256, "base_filters": 32, "max_filters": 512}
QUICK_SIZES = {"global_size": 64, "patch_size": 32, "base_filters": 8, "max_filters": 64}
PAPER_CROPPED_PHOTO = (2816, 3328)  # IDRiD's 2848 x 4288 after the centre crop
OVERLAP = 0.25
PREDICT_BATCH = 4


def _sizes(settings) -> dict:
    return QUICK_SIZES if settings.quick else PAPER_SIZES


def _metadata(network: str, sizes: dict, depths: dict) -> dict:
    """What a `rmib segment --model local-global` run stores, for the segmenter."""
    return {
        "task": "segment",
        "model": "local-global",
        "network": network,
        "lesion": TIMED_LESION,
        "preprocessing": {"method": "clahe", "centre_crop": True},
        "global_size": sizes["global_size"],
        "patch_size": sizes["patch_size"],
        "depths": depths,
        "predict_batch": PREDICT_BATCH,
    }


def _build_pair(precision: str, sizes: dict, depths: dict):
    """(fused model, LocalNet alone), built under `precision`'s dtype policy."""
    import keras

    from rmib.methods.local_global.model import build_local_global, build_local_net

    keras.mixed_precision.set_global_policy(precision)
    try:
        fused = build_local_global(
            depths["global"],
            depths["local"],
            sizes["base_filters"],
            sizes["max_filters"],
            sizes["global_size"],
        )
        local = build_local_net(depths["local"], sizes["base_filters"], sizes["max_filters"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return fused, local


def component_flops(fused, local, sizes: dict) -> dict:
    """Forward FLOPs of the parts a whole-photograph prediction runs.

    Returns:
        {"global": GlobalNet's trunk on the resized photograph, "fused_tile":
        LocalNet's trunk + the fusion head on one tile, "local_tile": LocalNet
        alone (trunk + its 1x1 head) on one tile}.
    """
    from benchmarks.flops import model_flops

    g, p = sizes["global_size"], sizes["patch_size"]
    head = fused.get_layer("fusion_head")
    return {
        "global": model_flops(fused.get_layer("global_trunk"), (g, g, 3)),
        "fused_tile": model_flops(fused.get_layer("local_trunk"), (p, p, 3))
        + model_flops(head, (p, p, head.input.shape[-1])),
        "local_tile": model_flops(local, (p, p, 3)),
    }


def _counting_segmenters(fused, local, sizes, depths):
    """Both segmenters, with counters of GlobalNet passes and tiles wrapped round them."""
    from rmib.methods.local_global.segmenter import LocalGlobalSegmenter

    counts = {"fused_tiles": 0, "global_passes": 0, "local_tiles": 0}
    fused_segmenter = LocalGlobalSegmenter(
        fused, _metadata("fused", sizes, depths), overlap=OVERLAP
    )
    local_segmenter = LocalGlobalSegmenter(
        local, _metadata("local", sizes, depths), overlap=OVERLAP
    )
    global_features = fused_segmenter._global_features
    local_fused = fused_segmenter._local_fused
    single = local_segmenter._single

    def count_global(image):
        counts["global_passes"] += 1
        return global_features(image)

    def count_fused(tiles, boxes, features):
        counts["fused_tiles"] += int(tiles.shape[0])
        return local_fused(tiles, boxes, features)

    def count_local(tiles):
        counts["local_tiles"] += int(tiles.shape[0])
        return single(tiles)

    fused_segmenter._global_features = count_global
    fused_segmenter._local_fused = count_fused
    local_segmenter._single = count_local
    return {"fused": fused_segmenter, "local": local_segmenter}, counts


def paper_flop_table(photo_shape=PAPER_CROPPED_PHOTO) -> list[dict]:
    """FLOPs of the fused model and LocalNet alone per lesion, at the paper's sizes and depths.

    Tiles: the full grid of `PAPER_SIZES` patches at `OVERLAP` over the
    centre-cropped photograph (no field-of-view skipping, which removes a few
    corner tiles and so raises GlobalNet's share a little).
    """
    import keras

    from rmib.inference.tiling import tile_grid
    from rmib.methods.local_global.model import build_local_global, build_local_net, default_depths

    sizes = PAPER_SIZES
    p = sizes["patch_size"]
    stride = p - round(OVERLAP * p)
    tiles = len(tile_grid(photo_shape[0], p, stride)) * len(tile_grid(photo_shape[1], p, stride))
    rows, cache = [], {}
    for lesion in LESIONS:
        depths = default_depths(lesion)
        key = (depths["global"], depths["local"])
        if key not in cache:
            keras.backend.clear_session()
            fused = build_local_global(
                *key, sizes["base_filters"], sizes["max_filters"], sizes["global_size"]
            )
            local = build_local_net(depths["local"], sizes["base_filters"], sizes["max_filters"])
            cache[key] = component_flops(fused, local, sizes)
            del fused, local
        flops = cache[key]
        fused_photo = flops["global"] + tiles * flops["fused_tile"]
        local_photo = tiles * flops["local_tile"]
        rows.append(
            {
                "lesion": lesion,
                "depths": depths,
                "tiles": tiles,
                "global_gflop": flops["global"] / 1e9,
                "fused_tile_gflop": flops["fused_tile"] / 1e9,
                "local_tile_gflop": flops["local_tile"] / 1e9,
                "fused_photo_tflop": fused_photo / 1e12,
                "local_photo_tflop": local_photo / 1e12,
                "flop_ratio": fused_photo / local_photo,
            }
        )
    keras.backend.clear_session()
    return rows


def local_global_prediction(settings, peak: dict, progress=None) -> dict:
    """Seconds per photograph: fused local-global U-Net vs LocalNet alone, per precision.

    Args:
        settings: `benchmarks.settings.Settings` (photo_shape, precisions,
            timed_steps: photographs timed per model, at most 2; quick).
        peak: `benchmarks.peak.measure_peak`'s result.
        progress: called with the partial result after each precision.

    Returns:
        {"settings", "rows": one per (precision, model), "paper": `paper_flop_table()`,
        "source": the photograph, "pending"}.
    """
    import keras
    import numpy as np

    from rmib.methods.local_global.model import default_depths

    sizes = _sizes(settings)
    depths = default_depths(TIMED_LESION)
    repeats = max(1, min(2, settings.timed_steps))
    image, source = photograph(settings.photo_shape, settings.quick)
    rows: list = []
    flops = None

    def result(pending=(), paper=None):
        return {
            "settings": {
                **sizes,
                "lesion": TIMED_LESION,
                "depths": depths,
                "photo_shape": list(settings.photo_shape),
                "overlap": OVERLAP,
                "predict_batch": PREDICT_BATCH,
                "repeats": repeats,
                "target": TARGET_OVERHEAD,
            },
            "rows": rows,
            "paper": paper,
            "source": source,
            "pending": list(pending),
        }

    for index, precision in enumerate(settings.precisions):
        keras.backend.clear_session()
        fused, local = _build_pair(precision, sizes, depths)
        if flops is None:  # the same shapes in every precision
            flops = component_flops(fused, local, sizes)
        segmenters, counts = _counting_segmenters(fused, local, sizes, depths)
        warmup = np.full((sizes["patch_size"], sizes["patch_size"], 3), 128, np.uint8)
        for segmenter in segmenters.values():
            segmenter.predict(warmup)  # traces the prediction functions
        counts.update(dict.fromkeys(counts, 0))
        load = load_average()
        seconds = {"local": [], "fused": []}
        for _ in range(repeats):
            for name in ("local", "fused"):
                start = time.perf_counter()
                prob = segmenters[name].predict(image)
                seconds[name].append(time.perf_counter() - start)
                assert prob.shape == image.shape[:2], prob.shape
        per_photo = {key: value / repeats for key, value in counts.items()}
        done = {
            "local": per_photo["local_tiles"] * flops["local_tile"],
            "fused": per_photo["global_passes"] * flops["global"]
            + per_photo["fused_tiles"] * flops["fused_tile"],
        }
        medians = {name: statistics.median(times) for name, times in seconds.items()}
        for name in ("local", "fused"):
            achieved = done[name] / medians[name] / 1e9
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "seconds": medians[name],
                    "spread": (min(seconds[name]), max(seconds[name])),
                    "tiles": round(per_photo[f"{name}_tiles"]),
                    "global_passes": per_photo["global_passes"] if name == "fused" else 0,
                    "photo_tflop": done[name] / 1e12,
                    "gflops": achieved,
                    "peak_percent": percent(achieved, peak_for(peak, precision)),
                    "time_ratio": medians[name] / medians["local"],
                    "flop_ratio": done[name] / done["local"],
                    "load": load,
                }
            )
        print(
            f"local_global_prediction {precision}: LocalNet {medians['local']:.2f} s, "
            f"fused {medians['fused']:.2f} s ({medians['fused'] / medians['local']:.2f}x; "
            f"FLOPs {done['fused'] / done['local']:.2f}x), "
            f"GlobalNet passes per photograph {per_photo['global_passes']:g}",
            flush=True,
        )
        del segmenters, fused, local
        if progress:
            pending = [f"{p} (timed)" for p in settings.precisions[index + 1 :]]
            progress(result([*pending, "paper FLOP table"]))
    keras.backend.clear_session()
    return result(paper=paper_flop_table())


def render_local_global(result: dict, machine: dict, settings) -> str:
    """The Markdown section of `local_global_prediction`."""
    s = result["settings"]
    height, width = s["photo_shape"]
    labels = {"local": "LocalNet alone", "fused": "fused local-global"}
    rows = []
    for row in result["rows"]:
        rows.append(
            [
                labels[row["model"]],
                row["precision"],
                row["tiles"],
                fmt(row["global_passes"], 0) if row["model"] == "fused" else "-",
                fmt(row["seconds"], 2),
                f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}",
                fmt(row["photo_tflop"], 3),
                fmt(row["gflops"]),
                fmt(row["peak_percent"]),
                fmt(row["time_ratio"], 2),
                fmt(row["flop_ratio"], 2),
                row["load"],
            ]
        )
    verdicts = []
    for row in result["rows"]:
        if row["model"] != "fused":
            continue
        met = "meets" if row["time_ratio"] <= s["target"] else "**misses**"
        verdicts.append(
            f"{row['precision']}: fused / LocalNet = {row['time_ratio']:.2f}x in time, "
            f"{row['flop_ratio']:.2f}x in FLOPs, {met} the {s['target']}x target; "
            f"GlobalNet ran {row['global_passes']:g} time(s) per photograph"
        )
    parts = [
        "## local_global_prediction",
        run_line(machine, settings),
        f"Whole-photograph prediction ({width}x{height}, {result['source']}) with the fused "
        f"local-global U-Net of Yan et al. (ISBI 2019) and with LocalNet alone, both through "
        "`rmib.methods.local_global.segmenter.LocalGlobalSegmenter` as `rmib predict` runs them (CLAHE, "
        "IDRiD centre crop when the photograph is large enough, FOV mask, tiles of "
        f"{s['patch_size']} px at overlap {s['overlap']}, {s['predict_batch']} tiles per "
        f"batch), lesion {s['lesion']}: GlobalNet depth {s['depths']['global']} on "
        f"{s['global_size']}x{s['global_size']}, LocalNet depth {s['depths']['local']}, base "
        f"width {s['base_filters']} doubling up to {s['max_filters']}; random weights, built "
        "under the precision policy. The two models of a precision take turns on the "
        f"photograph ({s['repeats']} time(s) each, median; tracing done before on a "
        "tile-sized image), so load changes hit both alike. FLOPs actually run: tiles x per-"
        "tile FLOPs (LocalNet's trunk + the fusion head for the fused model, LocalNet with "
        "its 1x1 head alone) + GlobalNet's trunk per pass; % of peak against the peak of the "
        "same precision. Ratios are against LocalNet alone in the same precision.",
        table(
            [
                "model",
                "precision",
                "tiles",
                "GlobalNet passes",
                "s / photograph",
                "s (min-max)",
                "TFLOP run",
                "GFLOP/s",
                "% of peak",
                "time vs LocalNet",
                "FLOPs vs LocalNet",
                "load",
            ],
            rows,
        ),
    ]
    if verdicts:
        parts.append("Target (issue #5): " + "; ".join(verdicts) + ".")
    paper = result.get("paper")
    if paper:
        p = PAPER_SIZES
        parts += [
            "### FLOPs at the paper's sizes and default depths",
            f"GlobalNet on {p['global_size']}x{p['global_size']}, LocalNet on "
            f"{p['patch_size']}-px tiles at overlap {OVERLAP} over the centre-cropped IDRiD "
            f"photograph ({PAPER_CROPPED_PHOTO[1]}x{PAPER_CROPPED_PHOTO[0]}: "
            f"{paper[0]['tiles']} tiles, the full grid), base width {p['base_filters']} "
            f"doubling up to {p['max_filters']}; depths per lesion from Yan et al. section "
            "2.1. Fused = GlobalNet's trunk once + tiles x (LocalNet's trunk + fusion head).",
            table(
                [
                    "lesion",
                    "depths (global, local)",
                    "GlobalNet GFLOP",
                    "fused GFLOP / tile",
                    "LocalNet GFLOP / tile",
                    "fused TFLOP / photograph",
                    "LocalNet TFLOP / photograph",
                    "FLOPs fused / LocalNet",
                ],
                [
                    [
                        row["lesion"],
                        f"{row['depths']['global']}, {row['depths']['local']}",
                        fmt(row["global_gflop"], 2),
                        fmt(row["fused_tile_gflop"], 2),
                        fmt(row["local_tile_gflop"], 2),
                        fmt(row["fused_photo_tflop"], 2),
                        fmt(row["local_photo_tflop"], 2),
                        fmt(row["flop_ratio"], 3),
                    ]
                    for row in paper
                ],
            ),
        ]
    parts += [peak_line(result), NOISE_NOTE]
    return "\n\n".join(parts)


__all__ = [
    "component_flops",
    "local_global_prediction",
    "paper_flop_table",
    "render_local_global",
]
