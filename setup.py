"""Build step that ships the top-level ``prompts/`` and ``experiments/`` folders inside the wheel.

Everything else about the package is in ``pyproject.toml``. The two folders stay at the repository
root (where users edit them) and are copied to ``medsae/prompts`` and ``medsae/experiments`` in the
build tree, where :mod:`medsae.resources` finds them with :mod:`importlib.resources`. An editable
install skips the copy: it reads the top-level folders directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_FOLDERS = {"prompts": ("*.j2",), "experiments": ("*.yaml",)}


class build_py_with_data(build_py):
    """``build_py`` plus a copy of each data folder into ``<build_lib>/medsae/<folder>``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in DATA_FOLDERS.items():
            source = ROOT / folder
            files = sorted({p for pattern in patterns for p in source.glob(pattern)})
            if not files:
                raise SystemExit(f"setup.py: {source} has no {', '.join(patterns)} files to package")
            target = Path(self.build_lib) / "medsae" / folder
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for path in files:
                shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": build_py_with_data})
