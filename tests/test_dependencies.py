"""rmib declares what it imports, and requirements.lock pins its runtime closure.

setup.cfg gives version ranges; requirements.lock pins, within them, the versions
tested together (`make` installs it as pip constraints). Regenerate the lock from
an environment where `make test` passes: `python tests/test_dependencies.py --write`.
"""

from __future__ import annotations

import ast
import configparser
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# The installers: `pip freeze` leaves them out too, and a pin would fight the venv's own.
NOT_LOCKED = {"pip", "setuptools", "wheel"}
# Needed at run time although no module of rmib imports it.
NOT_IMPORTED = {"tensorboard": "tf.summary writes every run's TensorBoard logs through it"}
LOCK_HEADER = """\
# The versions of rmib's runtime dependencies tested together (pip constraints).
# `make` installs them: pip install -c requirements.lock -e '.[dev]'. Every name of
# setup.cfg's install_requires and everything they need, within setup.cfg's ranges;
# pip, setuptools and wheel are left out, as `pip freeze` does.
# Regenerate from an environment where `make test` passes:
#   python tests/test_dependencies.py --write
"""


def install_requires() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    return [Requirement(line) for line in map(str.strip, lines) if line and line[0] != "#"]


def applies(requirement: Requirement, extras=("",)) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras)


def runtime_closure() -> dict[str, str]:
    """{name: installed version} of install_requires and what they need, here."""
    found: dict[str, str] = {}
    seen: set = set()
    todo = [r for r in install_requires() if applies(r)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} is needed by rmib but not installed here")
        found[name] = dist.version
        extras = ("", *requirement.extras)
        todo += [n for n in map(Requirement, dist.requires or []) if applies(n, extras)]
    return {name: version for name, version in found.items() if name not in NOT_LOCKED}


def read_lock() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(LOCK.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"requirements.lock line {number}: not a pin: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"requirements.lock line {number}: {name} pinned twice"
        pins[name] = spec.version
    return pins


def write_lock() -> str:
    closure = runtime_closure()
    text = LOCK_HEADER + "".join(f"{name}=={closure[name]}\n" for name in sorted(closure))
    LOCK.write_text(text, encoding="utf-8")
    return text


def imported_distributions() -> dict[str, set[str]]:
    """{distribution: modules of rmib importing it} for every third-party import of rmib."""
    owners = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "rmib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "rmib" or top in sys.stdlib_module_names:
                    continue
                # tomli: imported on Python 3.10 only, so maybe not installed here.
                for dist in owners.get(top, ["tomli"] if top == "tomli" else [top]):
                    found.setdefault(canonicalize_name(dist), set()).add(
                        str(path.relative_to(ROOT))
                    )
    return found


def test_rmib_declares_what_it_imports_and_nothing_else():
    declared = {canonicalize_name(r.name) for r in install_requires()}
    imported = imported_distributions()
    assert sorted(set(imported) - declared) == [], "imported but not in install_requires"
    unused = declared - set(imported) - set(NOT_IMPORTED)
    assert sorted(unused) == [], "in install_requires but imported nowhere in rmib"
    assert "h5py" in imported and "h5py" in declared  # rmib/models/backbones.py reads .h5


def test_the_lock_pins_every_requirement_within_its_range():
    pins = read_lock()
    for requirement in install_requires():
        if not applies(requirement):
            continue  # e.g. tomli, for Python 3.10 only
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside setup.cfg's {requirement}"
        )


def test_the_lock_is_the_runtime_closure_and_is_what_is_installed():
    pins = read_lock()
    closure = runtime_closure()
    assert sorted(set(closure) - set(pins)) == [], "needed at run time but not in the lock"
    assert sorted(set(pins) - set(closure)) == [], "in the lock but not needed at run time"
    differ = {name: (pins[name], closure[name]) for name in pins if pins[name] != closure[name]}
    assert differ == {}, "installed versions differ from the lock (pin, installed): run make"


def test_make_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    stamp_rule = makefile[makefile.index("$(STAMP):") :].split("\n\n")[0]
    assert "requirements.lock" in stamp_rule.splitlines()[0]  # edited lock -> reinstall
    assert "-c requirements.lock -e '.[dev]'" in stamp_rule


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_dependencies.py --write")
    print(write_lock(), end="")
