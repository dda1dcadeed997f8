"""The Colab notebooks run end to end headless (nbclient) with tiny injected parameters.

Every notebook executes in its own kernel (the project's Python, so the
editable rmib), with cwd a temporary folder shared by all of them: notebook 2
transfers notebook 1's encoder and notebook 6 exports notebook 2's segmenter,
as a user working through them in one WORK_DIR would. Each test checks what the
notebook wrote (run directories, PNGs, its summary JSON with finite metrics)
and that it showed plots inline.
"""

import json
import math
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(240)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COLAB = PROJECT_ROOT / "colab"
KERNEL_NAME = "rmib-test-python"

COMMON = """
SYNTHETIC_COUNT = 8
SYNTHETIC_SIZE = 64
PRECISION = "float32"
RUN_EAGERLY = True
"""
TINY = {
    "01_pretrain.ipynb": """
IMAGE_SIZE = 32
PRETRAIN_EPOCHS = 1
BATCH_SIZE = 4
STEPS_PER_EPOCH = 1
""",
    "02_segment.ipynb": """
IMAGE_SIZE = 32
PRETRAIN_EPOCHS = 1
PATCH_SIZE = 32
PATCHES_PER_EPOCH = 4
PREDICT_TILE = 64
EPOCHS = 1
BATCH_SIZE = 4
STEPS_PER_EPOCH = 1
SHOW = 2
""",
    "03_local_global.ipynb": """
PATCH_SIZE = 32
GLOBAL_SIZE = 64
BASE_FILTERS = 4
GLOBAL_DEPTH = 2
LOCAL_DEPTH = 2
EPOCHS_PER_PHASE = 1
BATCH_SIZE = 2
STEPS_PER_EPOCH = 1
AUGMENT = "none"
SHOW = 2
""",
    "04_dual2net.ipynb": """
IMAGE_SIZE = [32, 64]
HEAD_FILTERS = 8
EPOCHS = 1
BATCH_SIZE = 1
STEPS_PER_EPOCH = 2
SHOW = 2
""",
    "05_grading.ipynb": """
SYNTHETIC_COUNT = 10
SYNTHETIC_SIZE = 96
IMAGE_SIZE = 96
PATCH_SIZE = 16
OVERLAP = 8
GLOBAL_SIZE = 32
LOCAL_EPOCHS = 1
EPOCHS = 1
LOCAL_BATCH_SIZE = 64
BATCH_SIZE = 4
SHOW = 2
""",
    "06_export_and_serve.ipynb": """
PATCH_SIZE = 32
PATCHES_PER_EPOCH = 4
PREDICT_TILE = 64
EPOCHS = 1
BATCH_SIZE = 4
STEPS_PER_EPOCH = 1
TFLITE = False
""",  # TFLite conversion of the VGG16 U-Net takes ~30 s; tests/integration/test_export.py covers it
}
TIMINGS = {}


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernelspec running this interpreter (the project venv), in a private folder."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "rmib test",
                "language": "python",
                "env": {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
            }
        )
    )
    return [str(root)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("colab-work")


def inject(nb, name):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: exactly one cell must be tagged 'parameters'"
    cells[0].source = (
        cells[0].source + "\n\n# injected by tests/integration/test_notebooks.py" + COMMON
    )
    cells[0].source += TINY[name]


def run_notebook(name, kernel_dirs, work):
    nb = nbformat.read(COLAB / name, as_version=4)
    inject(nb, name)
    km = KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    client = NotebookClient(
        nb, km=km, timeout=200, resources={"metadata": {"path": str(work)}}, allow_errors=False
    )
    start = time.perf_counter()
    client.execute()
    TIMINGS[name] = time.perf_counter() - start
    nbformat.write(nb, work / f"executed-{name}")  # to look at when a check fails
    print(f"{name}: {TIMINGS[name]:.1f} s (cells: {', '.join(cell_times(nb))})")
    return nb


def cell_times(nb):
    from datetime import datetime

    times = []
    for index, cell in enumerate(nb.cells):
        execution = cell.metadata.get("execution", {})
        if "iopub.execute_input" in execution and "shell.execute_reply" in execution:
            start, end = (
                datetime.fromisoformat(execution[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            times.append(f"{index}:{(end - start).total_seconds():.1f}")
    return times


def summary(work, stem):
    return json.loads((work / "rmib-colab" / f"summary_{stem}.json").read_text())


def inline_images(nb) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


def assert_finite(values, names):
    for name in names:
        assert isinstance(values[name], (int, float)), name
        assert math.isfinite(values[name]), (name, values[name])


# --------------------------------------------------------------------------- generator


def test_generator_reproduces_the_committed_notebooks(tmp_path):
    sys.path.insert(0, str(COLAB))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(COLAB))
    written = make_notebooks.main(tmp_path)
    assert [p.name for p in written] == list(TINY)
    for path in written:
        assert path.read_text() == (COLAB / path.name).read_text(), f"rerun {path.name}"
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        source = "\n".join(c.source for c in nb.cells)
        # Installs and downloads only behind the Colab check.
        assert '"google.colab" in sys.modules' in source and "RMIB_REPO_URL" in source
        assert "pip" in source and "urlretrieve" in source and "write_dataset" in source


# --------------------------------------------------------------------------- notebooks


def test_01_pretrain(kernel_dirs, work):
    nb = run_notebook("01_pretrain.ipynb", kernel_dirs, work)
    run = work / "rmib-colab" / "runs" / "pretrain"
    for file in ("history.csv", "roc_curve.png", "metrics.json", "rmib.json"):
        assert (run / file).is_file(), file
    result = summary(work, "01_pretrain")
    assert_finite(result, ["accuracy", "recall"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] >= 2
    assert inline_images(nb) >= 3  # masks, history, ROC


def test_02_segment(kernel_dirs, work):
    nb = run_notebook("02_segment.ipynb", kernel_dirs, work)
    root = work / "rmib-colab"
    run = root / "runs" / "segment-ex"
    assert (run / "history.csv").is_file() and (run / "rmib.json").is_file()
    meta = json.loads((run / "rmib.json").read_text())
    assert meta["lesion"] == "EX"
    assert "pretrain" in json.dumps(meta) or "pretrain" in (run / "config.toml").read_text()
    result = summary(work, "02_segment")
    assert_finite(result, ["aupr", "f1", "iou"])
    assert result["images"] >= 1 and result["overlays"] >= 1
    assert (root / "evaluation" / "segment-ex" / "pr_curve.png").is_file()
    assert list((root / "evaluation" / "segment-ex" / "overlays").glob("*_compare.png"))
    assert inline_images(nb) >= 4  # history, overlays, PR curve, comparison maps


def test_03_local_global(kernel_dirs, work):
    nb = run_notebook("03_local_global.ipynb", kernel_dirs, work)
    result = summary(work, "03_local_global")
    assert result["phases"] == [
        f"history_{p}" for p in sorted(["global", "local", "fusion", "joint"])
    ]
    assert_finite(result, ["aupr", "f1", "iou"])
    meta = json.loads((Path(result["run"]) / "rmib.json").read_text())
    assert meta["model"] == "local-global"
    assert result["overlays"] >= 1 and inline_images(nb) >= 3


def test_04_dual2net(kernel_dirs, work):
    nb = run_notebook("04_dual2net.ipynb", kernel_dirs, work)
    result = summary(work, "04_dual2net")
    assert_finite(result, ["aupr", "f1", "iou"])
    meta = json.loads((Path(result["run"]) / "rmib.json").read_text())
    assert meta["model"] == "dual2net" and meta["image_size"] == [32, 64]
    assert result["overlays"] >= 1 and inline_images(nb) >= 3


def test_05_grading(kernel_dirs, work):
    nb = run_notebook("05_grading.ipynb", kernel_dirs, work)
    result = summary(work, "05_grading")
    run = Path(result["run"])
    for file in ("local_net.keras", "global_net.keras", "history_local.csv", "history_global.csv"):
        assert (run / file).is_file(), file
    assert result["predicted"] >= 1 and result["roc_pngs"]
    assert result["metrics"] and all(math.isfinite(v) for v in result["metrics"].values())
    assert inline_images(nb) >= 3


def test_06_export_and_serve(kernel_dirs, work):
    nb = run_notebook("06_export_and_serve.ipynb", kernel_dirs, work)
    result = summary(work, "06_export_and_serve")
    saved = Path(result["savedmodel"])
    assert (saved / "saved_model.pb").is_file() and (saved / "assets" / "rmib.json").is_file()
    assert {"segment_patch", "segment_image"} <= set(result["signatures"])
    assert result["check_differences"] and max(result["check_differences"].values()) < 1e-4
    assert result["tflite"] is None
    assert result["serve_difference"] < 1e-3  # TensorFlow alone gives rmib's probabilities
    assert inline_images(nb) >= 1
