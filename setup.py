"""Build hook: the wheel carries the recipes (`pretrain/`, `segment/`, `grading/`).

The top-level folders stay the recipes' source; `build_py` copies their TOML
files into `rmib/recipes/<folder>/` of the build (real files, no symlinks), where
`rmib.recipes` finds them in an installed rmib. An editable install needs no
copy: `rmib.recipes` reads the checkout's folders. Everything else is in setup.cfg.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RECIPE_FOLDERS = ("pretrain", "segment", "grading")


class build_py_with_recipes(build_py):  # noqa: N801 - setuptools' command naming
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder in RECIPE_FOLDERS:
            recipes = sorted((ROOT / folder).glob("*.toml"))
            if not recipes:
                raise SystemExit(f"setup.py: no recipes in {ROOT / folder}; the wheel needs them")
            target = Path(self.build_lib, "rmib", "recipes", folder)
            self.mkpath(str(target))
            for recipe in recipes:
                self.copy_file(str(recipe), str(target / recipe.name))


setup(cmdclass={"build_py": build_py_with_recipes})
