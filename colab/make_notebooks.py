"""Write the Colab notebooks of `colab/` (outputs cleared) from the cell sources below.

Run `python colab/make_notebooks.py` after editing this file; the notebooks are
generated, never edited by hand, so they stay reproducible. Every notebook:

- starts with `RMIB_REPO_URL`, the repository it installs rmib from on Colab
  (setup.cfg's `url`, else the placeholder `PLACEHOLDER_URL` that the README
  explains), or a wheel / source folder on Google Drive in `RMIB_DRIVE_PATH`;
  elsewhere it uses the installed package and never touches the network;
- says what to do when Colab gave it no GPU;
- reads the user's data from `DATA_DIR` (a Drive path on Colab), or unpacks
  the IDRiD archives downloaded from its official page (`IDRID_ARCHIVES`, with
  `rmib.data.archives.unpack_idrid`), or, on Colab only, downloads and unpacks
  the archive at `DATA_URL`; with none it writes the built-in synthetic
  dataset (`rmib.data.synthetic.write_dataset`);
- keeps its runs and the preprocessed-image cache (`cache_dir`) in `WORK_DIR`,
  on Drive on Colab, and after a disconnect resumes an interrupted run from its
  last checkpoint (a finished run is reused, never deleted);
- trains with `rmib.training.resolve_precision(PRECISION)` (mixed_float16 on a GPU);
- shows its plots inline (training history, ROC/PR curves, overlays);
- keeps every size in the cell tagged `parameters` (tests inject tiny ones)
  and writes `summary_<notebook>.json` to `WORK_DIR` with its key numbers.
"""

from __future__ import annotations

import configparser
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
PLACEHOLDER_URL = "https://github.com/YOUR-GITHUB-USER/rmib"
"""Where the repository lives, until setup.cfg names it (`url` under [metadata])."""
IDRID_PAGE = "https://idrid.grand-challenge.org/Data/"


def repository_url() -> str:
    """setup.cfg's `url` (a GitHub repository), else PLACEHOLDER_URL."""
    parser = configparser.ConfigParser()
    parser.read(HERE.parent / "setup.cfg", encoding="utf-8")
    url = parser.get("metadata", "url", fallback="").strip().removesuffix(".git").rstrip("/")
    return url or PLACEHOLDER_URL


def colab_link(name: str) -> str:
    """The "Open in Colab" address of notebook `name` on the repository's main branch."""
    repository = repository_url().split("github.com/", 1)[-1]
    return f"https://colab.research.google.com/github/{repository}/blob/main/colab/{name}"


def code(source: str, tags=()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(source).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def md(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(source).strip("\n"))


# --------------------------------------------------------------------------- shared cells

COMMON_PARAMETERS = """
# --- where rmib comes from (Colab only; ignored elsewhere) ---------------------------
RMIB_REPO_URL = "{repo_url}"  # the repository (or your fork) to install rmib from
RMIB_DRIVE_PATH = ""  # or a wheel / source folder on Drive, e.g. "/content/drive/MyDrive/rmib"
# --- your data ------------------------------------------------------------------------
DATA_DIR = ""  # a dataset folder, e.g. "/content/drive/MyDrive/IDRiD" (layout auto-detected)
IDRID_ARCHIVES = []  # or the .zip files of IDRiD's page (linked above), copied to Drive:
# ["/content/drive/MyDrive/A. Segmentation.zip", "/content/drive/MyDrive/B. Disease Grading.zip"]
DATA_URL = ""  # or a .zip / .tar.gz to download (Colab only); none of them = synthetic data
WORK_DIR = ""  # runs, cache, outputs; "" = /content/drive/MyDrive/rmib-runs on Colab
# (kept across disconnects: a run is resumed from its last checkpoint), ./rmib-colab elsewhere
CACHE_DIR = ""  # preprocessed photographs (memory-mapped); "" = WORK_DIR/cache
# --- synthetic data (used when no data is given) -------------------------------------
SYNTHETIC_LAYOUT = "idrid"
SYNTHETIC_COUNT = {count}
SYNTHETIC_SIZE = {size}
# --- training -------------------------------------------------------------------------
PRECISION = "auto"  # mixed_float16 on a GPU, float32 (or mixed_bfloat16) on a CPU
RUN_EAGERLY = False  # True: no graph tracing (only for tiny CPU runs)
SEED = 0
"""

SETUP = """
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
IN_COLAB = "google.colab" in sys.modules
WORK = Path(WORK_DIR or ("/content/drive/MyDrive/rmib-runs" if IN_COLAB else "rmib-colab"))
WORK = WORK.expanduser().resolve()
CACHE = Path(CACHE_DIR).expanduser().resolve() if CACHE_DIR else WORK / "cache"

if IN_COLAB:
    on_drive = (RMIB_DRIVE_PATH, DATA_DIR, WORK, CACHE, *IDRID_ARCHIVES)
    if any(str(p).startswith("/content/drive") for p in on_drive):
        from google.colab import drive

        drive.mount("/content/drive")
    try:
        import rmib  # noqa: F401  (already installed in this runtime)
    except ImportError:
        source = RMIB_DRIVE_PATH or f"git+{RMIB_REPO_URL}"
        if "YOUR-GITHUB-USER" in source:
            raise RuntimeError(
                "set RMIB_REPO_URL (the rmib repository or your fork) or RMIB_DRIVE_PATH "
                "in the parameters cell"
            )
        # setup.cfg gives version ranges, so Colab's own TensorFlow, Keras and NumPy
        # stay when they are in range (the pins of requirements.lock are for `make`).
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])
        print("rmib installed; if pip replaced TensorFlow, use Runtime > Restart session "
              "and run the notebook again")

import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import rmib
from rmib import io, training
from rmib.config import load_config
from rmib.data import readers, synthetic

WORK.mkdir(parents=True, exist_ok=True)
print(f"rmib {rmib.__version__}, TensorFlow {tf.__version__}, Colab: {IN_COLAB}, work dir: {WORK}")
"""

PRECISION_CELL = """
GPUS = training.visible_gpus()
PRECISION = training.resolve_precision(PRECISION)
print(f"GPUs: {[g.name for g in GPUS] or 'none'}; precision: {PRECISION}")
if IN_COLAB and not GPUS:
    print(
        "No GPU is attached to this Colab session, so the default sizes below would take "
        "hours on its CPU. Runtime > Change runtime type > Hardware accelerator: a GPU "
        "(e.g. T4) > Save, then Runtime > Run all: runs already in WORK_DIR on Drive are "
        "resumed. If Colab has no GPU for you now, set smaller sizes and epochs and go on."
    )
if RUN_EAGERLY:
    import warnings

    warnings.filterwarnings("ignore", message="Even though the `tf.config.experimental_run")
    tf.config.run_functions_eagerly(True)
"""

DATA_CELL = """
def unpack(archive, dest):
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.unpack_archive(str(archive), str(dest))
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def get_data(layout=SYNTHETIC_LAYOUT, count=SYNTHETIC_COUNT, size=SYNTHETIC_SIZE):
    \"\"\"DATA_DIR, else IDRID_ARCHIVES unpacked, else DATA_URL downloaded (Colab only),
    else the synthetic dataset.\"\"\"
    if DATA_DIR:
        root = Path(DATA_DIR).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"DATA_DIR {root} is not a folder")
        return root
    if IDRID_ARCHIVES:
        # IDRiD's official page (a login) gives "A. Segmentation.zip" and "B. Disease
        # Grading.zip"; unpacked once into WORK_DIR (a re-run skips what is there).
        from rmib.data.archives import unpack_idrid

        root = WORK / "data" / "IDRiD"
        unpack_idrid(IDRID_ARCHIVES, root)
        return root
    if DATA_URL:
        if not IN_COLAB:
            raise RuntimeError(
                "DATA_URL is downloaded only on Colab; download it yourself and set DATA_DIR"
            )
        import urllib.request

        name = DATA_URL.rstrip("/").split("/")[-1].split("?")[0] or "data.zip"
        archive = WORK / "download" / name
        if not archive.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {DATA_URL}")
            urllib.request.urlretrieve(DATA_URL, archive)
        return unpack(archive, WORK / "download" / (name.split(".")[0] + "-data"))
    root = WORK / "data" / f"synthetic-{layout}-{count}x{size}"
    if not (root / ".complete").is_file():
        synthetic.write_dataset(root, layout, count, size, SEED)
        (root / ".complete").write_text("")
    return root


DATA_ROOT = get_data()
dataset = readers.read_dataset(DATA_ROOT)
print(f"{DATA_ROOT}: layout {dataset.layout}, {len(dataset)} records")
"""

PLOTS = """
import csv


def plot_history(run_dir, title=""):
    \"\"\"One panel per history*.csv of a run: every logged quantity by epoch.\"\"\"
    files = sorted(Path(run_dir).glob("history*.csv"))
    if not files:
        print(f"no history in {run_dir}")
        return
    fig, axes = plt.subplots(1, len(files), figsize=(5 * len(files), 3.5), squeeze=False)
    for ax, path in zip(axes[0], files):
        rows = list(csv.DictReader(path.open()))
        epochs = [int(r["epoch"]) for r in rows]
        for key in rows[0]:
            if key in ("epoch", "learning_rate", "lr") or key.startswith("dsm"):
                continue
            values = [float(r[key]) if r[key] not in ("", None) else np.nan for r in rows]
            ax.plot(epochs, values, marker="o", label=key)
        ax.set_title(f"{title} {path.stem}".strip())
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    plt.tight_layout()
    plt.show()


def show_images(paths_or_arrays, titles=None, ncols=3, size=4):
    \"\"\"Show PNG files or arrays side by side.\"\"\"
    items = list(paths_or_arrays)
    if not items:
        print("nothing to show")
        return
    titles = titles or [Path(p).name if isinstance(p, (str, Path)) else "" for p in items]
    nrows = math.ceil(len(items) / ncols)
    ncols = min(ncols, len(items))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item, title in zip(axes.ravel(), items, titles):
        image = io.read_image(item) if isinstance(item, (str, Path)) else item
        ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None)
        ax.set_title(title, fontsize=9)
    plt.tight_layout()
    plt.show()


def train_or_resume(run_dir, train, result_key="validation", done_file="model.keras"):
    \"\"\"Train in `run_dir` on Drive; after a disconnect, run the notebook again: an
    interrupted run continues from its last checkpoint, a finished one is reused.
    (Delete a run, or give it another name, to train it again.)\"\"\"
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if (run_dir / done_file).is_file() and result_key in metrics:
        print(f"{run_dir}: finished earlier, reused")
        return metrics[result_key]
    resume = run_dir.is_dir() and any(run_dir.rglob("*.keras"))
    if resume:
        print(f"{run_dir}: resuming from its last checkpoint")
    return train(resume=resume)


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_summary(name, summary):
    path = WORK / f"summary_{name}.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    return path
"""


def header(title: str, text: str) -> nbformat.NotebookNode:
    return md(
        f"""
        # {title}

        {text}

        **On Colab**: Runtime > Change runtime type > GPU, then check `RMIB_REPO_URL` (or
        set `RMIB_DRIVE_PATH`) and give your data in the parameters cell (`DATA_DIR` on
        Drive; or `IDRID_ARCHIVES`, the .zip files of [IDRiD's page]({IDRID_PAGE}), which
        needs a login, copied to Drive; or `DATA_URL`) and run all. Runs and the cache
        go to `WORK_DIR` on Drive: after a disconnect, run all again and each run
        continues from its last checkpoint. With no data the notebook uses rmib's
        synthetic fundus photographs (exact lesion masks), so it runs end to end
        anywhere. Outside Colab nothing is installed or downloaded.
        """
    )


def standard_cells(parameters: str, count: int, size: int) -> list:
    return [
        code(
            COMMON_PARAMETERS.format(count=count, size=size, repo_url=repository_url() + ".git")
            + textwrap.dedent(parameters),
            tags=["parameters"],
        ),
        md("## Setup: install (Colab only), imports, precision"),
        code(SETUP),
        code(PRECISION_CELL),
        md("## Data"),
        code(DATA_CELL),
        code(PLOTS),
    ]


PRETRAIN_IF_NEEDED = """
from rmib import PretrainConfig, run_pretrain


def pretrain(out, resume=False):
    cfg = load_config(
        PretrainConfig,
        None,
        {
            "data": [str(DATA_ROOT)],
            "backbone": BACKBONE,
            "cbam": CBAM,
            "image_size": IMAGE_SIZE,
            "val_fraction": 0.25,
            "augment": "free",
            "cache_dir": str(CACHE),
            "out": str(out),
            "train.epochs": PRETRAIN_EPOCHS,
            "train.batch_size": BATCH_SIZE,
            "train.learning_rate": 1e-4,
            "train.steps_per_epoch": STEPS_PER_EPOCH,
            "train.precision": PRECISION,
            "train.seed": SEED,
            "train.tensorboard": False,
        },
    )
    return run_pretrain(cfg, resume=resume)
"""

SEGMENT_EVALUATE = """
from rmib.predict import evaluate_dataset, predict_files
from rmib import load_segmenter

segmenter = load_segmenter(SEG_RUN)
test_images = [r.image for r in dataset.records if r.has_mask(LESION) and r.split == "test"]
test_images = test_images or [r.image for r in dataset.records if r.has_mask(LESION)]
PRED_DIR = WORK / "predictions" / SEG_RUN.name
predict_files(segmenter, test_images[:SHOW], PRED_DIR)
show_images(sorted(PRED_DIR.glob("*_overlay.png")), ncols=SHOW)

EVAL_DIR = WORK / "evaluation" / SEG_RUN.name
split = "test" if any(r.split == "test" and r.has_mask(LESION) for r in dataset.records) else None
evaluation = evaluate_dataset(segmenter, [DATA_ROOT], EVAL_DIR, split=split)
print({k: evaluation[k] for k in ("images", "aupr", "f1", "iou")})
show_images([EVAL_DIR / "pr_curve.png"], ncols=1, size=5)
"""

SEGMENT_OVERLAYS = """
# Evaluation comparison maps: true positives yellow, false positives green, misses red.
compare = sorted((EVAL_DIR / "overlays").glob("*_compare.png"))[:SHOW]
show_images(compare, ncols=SHOW)
"""


def summary_cell(name: str, body: str) -> nbformat.NotebookNode:
    return code(textwrap.dedent(body).strip("\n") + f'\n\nwrite_summary("{name}", summary)')


# --------------------------------------------------------------------------- notebooks


def nb_pretrain():
    params = """
    # --- stage 1: the lesion / healthy classifier ---------------------------------------
    BACKBONE = "vgg16"  # or "resnet50"
    CBAM = True
    IMAGE_SIZE = 256  # the paper uses 480
    PRETRAIN_EPOCHS = 5
    BATCH_SIZE = 8
    STEPS_PER_EPOCH = None  # None = one pass over the training images
    """
    return [
        header(
            "1. Pretrain a lesion classifier (stage 1)",
            "Train a VGG16 (optionally CBAM) lesion / healthy classifier with "
            "`rmib.run_pretrain`. Its encoder is what notebook 2 transfers to "
            "lesion segmentation. Keep `WORK_DIR` the same across the notebooks.",
        ),
        *standard_cells(params, count=40, size=512),
        md("## A look at the photographs and their lesion masks"),
        code(
            """
            from rmib import report

            shown = [r for r in dataset.records if r.masks][:3] or dataset.records[:3]
            pictures = []
            for record in shown:
                image = io.read_image(record.image)
                masks = {k: io.read_mask(p, image.shape[:2]) if p is not None else None
                         for k, p in (record.masks or {}).items() if k != "OD"}
                pictures.append(report.masks_overlay(image, masks) if masks else image)
            show_images(pictures, [r.name for r in shown])
            """
        ),
        md("## Train"),
        code(PRETRAIN_IF_NEEDED),
        code(
            """
            PRETRAIN_RUN = WORK / "runs" / "pretrain"
            result = train_or_resume(PRETRAIN_RUN, lambda resume: pretrain(PRETRAIN_RUN, resume))
            """
        ),
        md("## Training history and validation ROC"),
        code(
            """
            plot_history(PRETRAIN_RUN, "pretrain")
            show_images([PRETRAIN_RUN / "roc_curve.png"], ncols=1, size=5)
            """
        ),
        summary_cell(
            "01_pretrain",
            """
            summary = {
                "run": str(PRETRAIN_RUN),
                **{k: result[k] for k in ("accuracy", "roc_auc", "recall", "precision", "n")},
            }
            """,
        ),
    ]


def nb_segment():
    params = """
    # --- stage 1 encoder: notebook 1's run (trained here first when missing) -------------
    PRETRAIN_RUN = ""  # "" = WORK_DIR/runs/pretrain
    BACKBONE = "vgg16"
    CBAM = True
    IMAGE_SIZE = 256
    PRETRAIN_EPOCHS = 5
    # --- stage 2: the lesion segmenter ---------------------------------------------------
    LESION = "EX"  # EX, HE, MA or SE
    PATCH_SIZE = 160  # multiple of 32
    PATCHES_PER_EPOCH = 512
    PREDICT_TILE = "auto"  # auto: the fewest tiles of at most 1024 px over the field of view
    EPOCHS = 10
    BATCH_SIZE = 8
    STEPS_PER_EPOCH = None
    SHOW = 3  # photographs shown with overlays
    """
    return [
        header(
            "2. Segment a lesion with the transferred encoder (stage 2)",
            "The frozen encoder of notebook 1's classifier under a U-Net decoder "
            "(`rmib.run_segment`), then whole-photograph predictions by "
            "overlapping tiles (`PREDICT_TILE = \"auto\"`: the fewest tiles of at most "
            "1024x1024 px covering the field of view, blended across a 64-px halo), "
            "overlays and an evaluation on the held-out split.",
        ),
        *standard_cells(params, count=40, size=512),
        md("## The stage-1 encoder"),
        code(PRETRAIN_IF_NEEDED),
        code(
            """
            ENCODER_RUN = Path(PRETRAIN_RUN) if PRETRAIN_RUN else WORK / "runs" / "pretrain"
            if not (ENCODER_RUN / "model.keras").is_file():
                print(f"no finished stage-1 run at {ENCODER_RUN}: pretraining one first")
                train_or_resume(ENCODER_RUN, lambda resume: pretrain(ENCODER_RUN, resume))
            print(json.loads((ENCODER_RUN / "metrics.json").read_text()).get("validation"))
            """
        ),
        md("## Train the segmenter"),
        code(
            """
            from rmib import run_segment
            from rmib import SegmentConfig

            SEG_RUN = WORK / "runs" / f"segment-{LESION.lower()}"
            seg_cfg = load_config(
                SegmentConfig,
                None,
                {
                    "data": [str(DATA_ROOT)],
                    "lesion": LESION,
                    "encoder": str(ENCODER_RUN),
                    "patch_size": PATCH_SIZE,
                    "patches_per_epoch": PATCHES_PER_EPOCH,
                    "predict_tile": PREDICT_TILE,
                    "val_fraction": 0.2,
                    "cache_dir": str(CACHE),
                    "out": str(SEG_RUN),
                    "train.epochs": EPOCHS,
                    "train.batch_size": BATCH_SIZE,
                    "train.steps_per_epoch": STEPS_PER_EPOCH,
                    "train.precision": PRECISION,
                    "train.seed": SEED,
                    "train.tensorboard": False,
                },
            )
            validation = train_or_resume(SEG_RUN, lambda resume: run_segment(seg_cfg, resume))
            plot_history(SEG_RUN, LESION)
            """
        ),
        md("## Predict whole photographs, look at the overlays, evaluate"),
        code(SEGMENT_EVALUATE),
        code(SEGMENT_OVERLAYS),
        summary_cell(
            "02_segment",
            """
            summary = {
                "run": str(SEG_RUN),
                "lesion": LESION,
                "validation_aupr": validation.get("aupr"),
                **{k: evaluation[k] for k in ("images", "aupr", "f1", "iou")},
                "overlays": len(list(PRED_DIR.glob("*_overlay.png"))),
            }
            """,
        ),
    ]


def nb_local_global():
    params = """
    # --- the fused local-global U-Net (Yan et al., ISBI 2019) ---------------------------
    LESION = "EX"
    PATCH_SIZE = 128  # local patch side, multiple of 2 ** LOCAL_DEPTH
    GLOBAL_SIZE = 640  # side of the downsampled whole photograph
    BASE_FILTERS = 32
    GLOBAL_DEPTH = 0  # 0 = the paper's per-lesion default
    LOCAL_DEPTH = 0
    EPOCHS_PER_PHASE = 0  # 0 = the paper's schedule; phases: global, local, fusion, joint
    BATCH_SIZE = 8
    STEPS_PER_EPOCH = None
    AUGMENT = "free"
    SHOW = 3
    """
    return [
        header(
            "3. Local-global U-Nets for small lesions",
            "Yan et al. (ISBI 2019): a global U-Net on the downsampled photograph and a "
            "local U-Net on full-resolution patches, fused and trained in four phases "
            "(`SegmentConfig(model=\"local-global\")`, settings under `local_global.*`).",
        ),
        *standard_cells(params, count=40, size=1024),
        md("## Train the four phases"),
        code(
            """
            from rmib import run_segment
            from rmib import SegmentConfig

            SEG_RUN = WORK / "runs" / f"local-global-{LESION.lower()}"
            seg_cfg = load_config(
                SegmentConfig,
                None,
                {
                    "data": [str(DATA_ROOT)],
                    "model": "local-global",
                    "lesion": LESION,
                    "patch_size": PATCH_SIZE,
                    "augment": AUGMENT,
                    "val_fraction": 0.2,
                    "cache_dir": str(CACHE),
                    "out": str(SEG_RUN),
                    "local_global.global_size": GLOBAL_SIZE,
                    "local_global.base_filters": BASE_FILTERS,
                    "local_global.global_depth": GLOBAL_DEPTH,
                    "local_global.local_depth": LOCAL_DEPTH,
                    "local_global.epochs_per_phase": EPOCHS_PER_PHASE,
                    "train.batch_size": BATCH_SIZE,
                    "train.steps_per_epoch": STEPS_PER_EPOCH,
                    "train.precision": PRECISION,
                    "train.seed": SEED,
                    "train.tensorboard": False,
                },
            )
            validation = train_or_resume(SEG_RUN, lambda resume: run_segment(seg_cfg, resume))
            plot_history(SEG_RUN, LESION)
            """
        ),
        md("## Predict, look at the overlays, evaluate"),
        code(SEGMENT_EVALUATE),
        code(SEGMENT_OVERLAYS),
        summary_cell(
            "03_local_global",
            """
            summary = {
                "run": str(SEG_RUN),
                "lesion": LESION,
                "phases": sorted(p.stem for p in SEG_RUN.glob("history_*.csv")),
                "validation_aupr": validation.get("aupr"),
                **{k: evaluation[k] for k in ("images", "aupr", "f1", "iou")},
                "overlays": len(list(PRED_DIR.glob("*_overlay.png"))),
            }
            """,
        ),
    ]


def nb_dual2net():
    params = """
    # --- Dual2Net: two branches, one resized photograph, the DSM Dice loss ---------------
    LESION = "EX"
    ENCODER = "vgg16"  # or a stage-1 run directory (notebook 1), e.g. "rmib-colab/runs/pretrain"
    IMAGE_SIZE = [960, 1440]  # [height, width] the whole photograph is resized to (IDRiD)
    HEAD_FILTERS = 512
    VARIANT = "dual-dsm"
    EPOCHS = 10
    BATCH_SIZE = 2
    STEPS_PER_EPOCH = None
    SHOW = 3
    """
    return [
        header(
            "4. Dual2Net",
            "Two branches share one encoder (only its last block and the heads are "
            "separate) and both see the whole photograph resized to `IMAGE_SIZE` "
            "([height, width]: 960x1440 for IDRiD, 1024x1024 for DDR). The dual-sampling "
            "modulated (DSM) Dice loss trains one branch on Dice over all pixels (large "
            "lesions) and the other on Dice over a re-balanced sample of lesion and "
            "background pixels (small lesions), weighted alpha = 1 - (epoch/epochs)^2 "
            "(large lesions first), plus 0.4 x the auxiliary heads' Dice "
            "(`SegmentConfig(model=\"dual2net\")`, settings under `dual2net.*`). "
            "The saved model averages the two branches.",
        ),
        *standard_cells(params, count=40, size=1024),
        md("## Train"),
        code(
            """
            from rmib import run_segment
            from rmib import SegmentConfig

            SEG_RUN = WORK / "runs" / f"dual2net-{LESION.lower()}"
            seg_cfg = load_config(
                SegmentConfig,
                None,
                {
                    "data": [str(DATA_ROOT)],
                    "model": "dual2net",
                    "lesion": LESION,
                    "encoder": ENCODER,
                    "val_fraction": 0.2,
                    "cache_dir": str(CACHE),
                    "out": str(SEG_RUN),
                    "dual2net.image_size": list(IMAGE_SIZE),
                    "dual2net.head_filters": HEAD_FILTERS,
                    "dual2net.variant": VARIANT,
                    "train.epochs": EPOCHS,
                    "train.batch_size": BATCH_SIZE,
                    "train.steps_per_epoch": STEPS_PER_EPOCH,
                    "train.precision": PRECISION,
                    "train.seed": SEED,
                    "train.tensorboard": False,
                },
            )
            validation = train_or_resume(SEG_RUN, lambda resume: run_segment(seg_cfg, resume))
            plot_history(SEG_RUN, LESION)
            """
        ),
        md("## Predict, look at the overlays, evaluate"),
        code(SEGMENT_EVALUATE),
        code(SEGMENT_OVERLAYS),
        summary_cell(
            "04_dual2net",
            """
            summary = {
                "run": str(SEG_RUN),
                "lesion": LESION,
                "validation_aupr": validation.get("aupr"),
                **{k: evaluation[k] for k in ("images", "aupr", "f1", "iou")},
                "overlays": len(list(PRED_DIR.glob("*_overlay.png"))),
            }
            """,
        ),
    ]


def nb_grading():
    params = """
    # --- the two-stage DR grader (Yang et al., MICCAI 2017) -----------------------------
    IMAGE_SIZE = 800
    PATCH_SIZE = 64
    OVERLAP = 32
    GLOBAL_SIZE = 256
    GRADES = 4
    LOCAL_EPOCHS = 10
    EPOCHS = 30
    LOCAL_BATCH_SIZE = 128
    BATCH_SIZE = 16
    BASELINE = True  # also train the non-weighted baseline
    SHOW = 3
    """
    return [
        header(
            "5. Grading diabetic retinopathy",
            "A local net labels the patches of an overlapping grid (normal, MA, "
            "haemorrhage, exudate); a global net grades the photograph weighted by that "
            "lesion map (`rmib.train_grader`, `predict_images`, `evaluate_grader`). "
            "Training needs images with MA/HE/EX masks and graded images (IDRiD has both).",
        ),
        *standard_cells(params, count=60, size=800),
        md("## Train the local and global nets"),
        code(
            """
            from rmib import GradeConfig, load_grader, train_grader
            from rmib.methods.grading.evaluate import evaluate_grader
            from rmib.methods.grading.grader import predict_images

            GRADE_RUN = WORK / "runs" / "grade"
            grade_cfg = load_config(
                GradeConfig,
                None,
                {
                    "data": [str(DATA_ROOT)],
                    "image_size": IMAGE_SIZE,
                    "patch_size": PATCH_SIZE,
                    "overlap": OVERLAP,
                    "global_size": GLOBAL_SIZE,
                    "grades": GRADES,
                    "baseline": BASELINE,
                    "cache_dir": str(CACHE),
                    "local_train.epochs": LOCAL_EPOCHS,
                    "local_train.batch_size": LOCAL_BATCH_SIZE,
                    "local_train.precision": PRECISION,
                    "local_train.seed": SEED,
                    "local_train.tensorboard": False,
                    "train.epochs": EPOCHS,
                    "train.batch_size": BATCH_SIZE,
                    "train.precision": PRECISION,
                    "train.seed": SEED,
                    "train.tensorboard": False,
                },
            )
            trained = train_or_resume(
                GRADE_RUN,
                lambda resume: train_grader(
                    grade_cfg, GRADE_RUN, resume=resume, verbose=2 if IN_COLAB else 0
                ),
                result_key="data",
                done_file="metrics.json",
            )
            print(trained)
            plot_history(GRADE_RUN, "grade")
            """
        ),
        md("## Grade photographs and look at their lesion maps"),
        code(
            """
            grader = load_grader(GRADE_RUN)
            graded = [r for r in dataset.records if r.grade is not None]
            pick = [r for r in graded if r.split == "test"] or graded
            GRADE_PRED = WORK / "grade-predictions"
            rows = predict_images(grader, [r.image for r in pick[:SHOW]], GRADE_PRED)
            show_images(
                [GRADE_PRED / row["lesion_map"] for row in rows],
                [f"{Path(row['image']).stem}: grade {row['grade']}" for row in rows],
                ncols=SHOW,
            )
            """
        ),
        md("## Evaluate: patch-level and referable-DR ROC curves"),
        code(
            """
            GRADE_EVAL = WORK / "grade-evaluation"
            grade_eval = evaluate_grader(grader, [DATA_ROOT], GRADE_EVAL)
            show_images(sorted(GRADE_EVAL.glob("*.png")), ncols=3, size=4)
            """
        ),
        summary_cell(
            "05_grading",
            """
            def flat(d, prefix=""):
                out = {}
                for k, v in d.items():
                    if isinstance(v, dict):
                        out.update(flat(v, f"{prefix}{k}."))
                    elif isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"{prefix}{k}"] = v
                return out

            summary = {
                "run": str(GRADE_RUN),
                "predicted": len(rows),
                "roc_pngs": sorted(p.name for p in GRADE_EVAL.glob("*.png")),
                "metrics": flat(json.loads((GRADE_EVAL / "metrics.json").read_text())),
            }
            """,
        ),
    ]


def nb_export():
    params = """
    # --- the model to export: a segment run (notebook 2; trained here when missing) -----
    SEG_RUN = ""  # "" = WORK_DIR/runs/segment-ex
    LESION = "EX"
    PATCH_SIZE = 160
    PATCHES_PER_EPOCH = 512
    PREDICT_TILE = "auto"  # auto: the fewest tiles of at most 1024 px over the field of view
    EPOCHS = 5
    BATCH_SIZE = 8
    STEPS_PER_EPOCH = None
    TFLITE = True  # also write the segment_patch signature as .tflite
    """
    return [
        header(
            "6. Export and serve",
            "Export a segmenter as a TensorFlow SavedModel (`rmib.export_model`, "
            "checked against the Keras model), then serve it with TensorFlow alone: its "
            "`segment_image` signature tiles a whole photograph inside the graph.",
        ),
        *standard_cells(params, count=24, size=512),
        md("## The segmenter to export"),
        code(
            """
            SEG_RUN = Path(SEG_RUN) if SEG_RUN else WORK / "runs" / f"segment-{LESION.lower()}"
            if not (SEG_RUN / "model.keras").is_file():
                from rmib import run_segment
                from rmib import SegmentConfig

                print(f"no finished segment run at {SEG_RUN}: training a small one first")
                seg_cfg = load_config(SegmentConfig, None, {
                    "data": [str(DATA_ROOT)],
                    "lesion": LESION,
                    "patch_size": PATCH_SIZE,
                    "patches_per_epoch": PATCHES_PER_EPOCH,
                    "predict_tile": PREDICT_TILE,
                    "cache_dir": str(CACHE),
                    "out": str(SEG_RUN),
                    "train.epochs": EPOCHS,
                    "train.batch_size": BATCH_SIZE,
                    "train.steps_per_epoch": STEPS_PER_EPOCH,
                    "train.precision": PRECISION,
                    "train.seed": SEED,
                    "train.tensorboard": False,
                })
                train_or_resume(SEG_RUN, lambda resume: run_segment(seg_cfg, resume))
            print(json.loads((SEG_RUN / "rmib.json").read_text())["model"], SEG_RUN)
            """
        ),
        md("## Export (SavedModel, checked; optionally TFLite)"),
        code(
            """
            import shutil

            from rmib import export_model

            EXPORT_DIR = WORK / "export"
            shutil.rmtree(EXPORT_DIR, ignore_errors=True)
            exported = export_model(SEG_RUN, EXPORT_DIR / "savedmodel", check=True)
            print(exported.path, exported.signatures, exported.differences)
            tflite = None
            if TFLITE:
                tflite = export_model(SEG_RUN, EXPORT_DIR / "model.tflite", format="tflite")
                print(tflite.path, f"{tflite.path.stat().st_size / 1e6:.1f} MB")
            """
        ),
        md(
            """
            ## Serve with TensorFlow alone

            The SavedModel takes the photograph after the preprocessing its metadata
            names (CLAHE has no TensorFlow op) and its field-of-view mask; see README
            "Serving a SavedModel" for a NumPy/OpenCV-only version of `prepare`.
            """
        ),
        code(
            """
            from rmib import report
            from rmib.data import fundus
            from rmib import load_segmenter

            served = tf.saved_model.load(str(exported.path))
            served_meta = json.loads(served.signatures["metadata"]()["json"].numpy().decode())
            print({k: served_meta[k] for k in ("lesion", "threshold") if k in served_meta})


            def prepare(rgb, preprocessing):
                fov = fundus.fov_mask(rgb)
                return fundus.preprocess(rgb, preprocessing["method"]), fov


            records = [r for r in dataset.records if r.has_mask(LESION)]
            photo = io.read_image((records or dataset.records)[-1].image)
            image, fov = prepare(photo, served_meta["preprocessing"])
            out = served.signatures["segment_image"](image=tf.constant(image), fov=tf.constant(fov))
            served_prob = out["probability"].numpy()
            keras_prob = load_segmenter(SEG_RUN).predict(photo)
            serve_difference = float(np.abs(served_prob - keras_prob).max())
            print(f"served vs Keras: max abs difference {serve_difference:.2e}")
            colour = report.LESION_COLOURS.get(LESION, (255, 255, 0))
            show_images(
                [photo, report.probability_overlay(photo, served_prob, colour),
                 out["mask"].numpy() * 255],
                ["photograph", "served probability", "served mask"],
            )
            """
        ),
        summary_cell(
            "06_export_and_serve",
            """
            summary = {
                "savedmodel": str(exported.path),
                "signatures": list(exported.signatures),
                "check_differences": dict(exported.differences),
                "tflite": str(tflite.path) if tflite else None,
                "serve_difference": serve_difference,
            }
            """,
        ),
    ]


NOTEBOOKS = {
    "01_pretrain.ipynb": nb_pretrain,
    "02_segment.ipynb": nb_segment,
    "03_local_global.ipynb": nb_local_global,
    "04_dual2net.ipynb": nb_dual2net,
    "05_grading.ipynb": nb_grading,
    "06_export_and_serve.ipynb": nb_export,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    title, rest = nb.cells[0].source.split("\n", 1)
    nb.cells[0].source = f"{title}\n\n[Open in Colab]({colab_link(name)})\n{rest}"
    nb.metadata.update(
        {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "T4", "name": name},
        }
    )
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem}-{index:02d}"
    return nb


def main(out_dir=HERE) -> list[Path]:
    written = []
    for name in NOTEBOOKS:
        nb = build(name)
        nbformat.validate(nb)
        path = Path(out_dir) / name
        path.write_text(nbformat.writes(nb))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(f"wrote {path}")
