"""What a non-editable install (pip install ., a wheel) holds: pyproject.toml names every package."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11's
ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_wheel():
    """setuptools' explicit package list takes no subpackage by itself: a missing one (spin_fast.generation was)
    leaves `spin-fast` broken outside an editable install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]  # package name -> its folder
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert found and set(setuptools["packages"]) == found
