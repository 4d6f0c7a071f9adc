"""What an installed (not editable) copy needs: the Docker image installs the package, so a
file the code reads that the package data leaves out works here and fails there."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from charrnn import native

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_holds_every_native_source_and_header():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["charrnn"]
    package = ROOT / "charrnn"
    for path in [*native.SOURCES, *native.HEADERS]:
        name = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in the package data"
