"""`import rmib` makes every custom Keras object of rmib known to `keras.models.load_model`."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

from rmib.models.layers import CBAM, ImageNetPreprocessing
from rmib.training import RunDirectory

ROOT = Path(__file__).resolve().parents[1]


def _tiny_model():
    inputs = keras.Input((16, 16, 3))
    x = ImageNetPreprocessing()(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = CBAM(ratio=2, kernel_size=3)(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, outputs)


def test_a_fresh_process_loads_a_keras_file_rmib_wrote_after_import_rmib(tmp_path):
    model = _tiny_model()
    path = RunDirectory(tmp_path).save_model(model, tmp_path / "tiny.keras", {"task": "test"})
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x)))
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import rmib, keras\n"
        "assert 'rmib.models' not in sys.modules  # nothing of rmib imported up front\n"
        f"model = keras.models.load_model({str(path)!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"expected = np.load({str(tmp_path / 'y.npy')!r})\n"
        "np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, atol=1e-5)\n"
        "print(type(model.layers[1]).__name__, type(model.layers[3]).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ImageNetPreprocessing", "CBAM"]


def test_without_import_rmib_keras_does_not_know_rmib_layers(tmp_path):
    """The control: the file needs rmib's registrations (so the test above can fail)."""
    path = RunDirectory(tmp_path).save_model(_tiny_model(), tmp_path / "tiny.keras", {})
    code = f"import keras\nkeras.models.load_model({str(path)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert result.returncode != 0 and "ImageNetPreprocessing" in result.stderr


def test_import_rmib_after_keras_registers_too(tmp_path):
    path = RunDirectory(tmp_path).save_model(_tiny_model(), tmp_path / "tiny.keras", {})
    code = f"import keras\nimport rmib\nkeras.models.load_model({str(path)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
