"""The Colab notebooks' generator (colab/make_notebooks.py) without running a notebook:
what every notebook holds, the README's "Open in Colab" links, and the notebooks'
train-or-resume helper. tests/integration/test_notebooks.py executes them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"


@pytest.fixture(scope="module")
def generator():
    sys.path.insert(0, str(COLAB))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(COLAB))
    return make_notebooks


def committed(name):
    return nbformat.read(COLAB / name, as_version=4)


def test_every_notebook_starts_with_the_repository_url_and_its_colab_link(generator):
    url = generator.repository_url()
    for name in generator.NOTEBOOKS:
        nb = committed(name)
        assert generator.colab_link(name) in nb.cells[0].source
        (parameters,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        first = next(line for line in parameters.source.splitlines() if "=" in line)
        assert first.startswith(f'RMIB_REPO_URL = "{url}.git"'), (name, first)


def test_the_repository_comes_from_setup_cfg_or_is_the_named_placeholder(generator, tmp_path):
    (tmp_path / "colab").mkdir()
    (tmp_path / "setup.cfg").write_text("[metadata]\nurl = https://github.com/owner/repo.git\n")
    real_here = generator.HERE
    try:
        generator.HERE = tmp_path / "colab"
        assert generator.repository_url() == "https://github.com/owner/repo"
        assert generator.colab_link("01_pretrain.ipynb") == (
            "https://colab.research.google.com/github/owner/repo/blob/main/colab/01_pretrain.ipynb"
        )
        (tmp_path / "setup.cfg").write_text("[metadata]\nname = rmib\n")
        assert generator.repository_url() == generator.PLACEHOLDER_URL
    finally:
        generator.HERE = real_here


def test_the_readme_links_every_notebook_to_colab(generator):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", readme)
    assert sorted(links) == sorted(generator.colab_link(name) for name in generator.NOTEBOOKS)
    if generator.repository_url() == generator.PLACEHOLDER_URL:
        assert "YOUR-GITHUB-USER/rmib` is a placeholder" in readme


def test_runs_are_resumed_on_drive_never_deleted(generator):
    for name in generator.NOTEBOOKS:
        source = "\n".join(c.source for c in committed(name).cells)
        assert "rmtree(PRETRAIN_RUN" not in source and "rmtree(SEG_RUN" not in source
        assert "rmtree(GRADE_RUN" not in source
        assert "train_or_resume(" in source and "cache_dir" in source, name
        assert '"/content/drive/MyDrive/rmib-runs" if IN_COLAB' in source
        assert "No GPU is attached" in source and "Change runtime type" in source
        assert "IDRID_ARCHIVES" in source and "unpack_idrid(IDRID_ARCHIVES" in source
        assert "PREDICT_TILE = 512" not in source


def test_notebook_04_describes_dsm_and_image_size_as_rmib_does(generator):
    source = "\n".join(c.source for c in committed("04_dual2net.ipynb").cells)
    assert "two resolutions" not in source and "[low, high]" not in source
    assert "IMAGE_SIZE = [960, 1440]  # [height, width]" in source
    assert "dual-sampling modulated (DSM) Dice loss" in source


def _train_or_resume(generator):
    """The helper as the notebooks define it, executed from the generator's cell source."""
    namespace = {"json": json, "Path": Path}
    start = generator.PLOTS.index("def train_or_resume")
    end = generator.PLOTS.index("def finite")
    exec(generator.PLOTS[start:end], namespace)  # noqa: S102 - the notebook's own code
    return namespace["train_or_resume"]


def test_train_or_resume_trains_resumes_or_reuses(generator, tmp_path):
    train_or_resume = _train_or_resume(generator)
    calls = []

    def train(resume):
        calls.append(resume)
        return {"aupr": 0.5}

    run = tmp_path / "run"
    assert train_or_resume(run, train) == {"aupr": 0.5} and calls == [False]  # new
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("")
    assert train_or_resume(run, train) == {"aupr": 0.5} and calls == [False, False]
    (run / "checkpoints" / "last.keras").write_bytes(b"x")  # interrupted
    train_or_resume(run, train)
    assert calls == [False, False, True]
    (run / "model.keras").write_bytes(b"x")
    (run / "metrics.json").write_text(json.dumps({"validation": {"aupr": 0.25}}))
    assert train_or_resume(run, train) == {"aupr": 0.25}  # finished: reused, not trained
    assert calls == [False, False, True]
    grade = tmp_path / "grade"
    grade.mkdir()
    (grade / "metrics.json").write_text(json.dumps({"data": {"graded_images": 3}}))
    kept = train_or_resume(grade, train, result_key="data", done_file="metrics.json")
    assert kept == {"graded_images": 3} and len(calls) == 3
