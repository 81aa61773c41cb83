"""What a non-editable install (pip install ., a wheel) holds: pyproject.toml names every package."""

import re
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


def test_flash_attn_is_installed_against_the_torch_already_there():
    """flash-attn is a source archive whose setup.py imports torch: pip builds it in an isolated environment that has
    no torch ("ModuleNotFoundError: No module named 'torch'", pip 25 and flash-attn 2.8.3, with torch installed in
    the venv), so an extra that lists it fails the whole install (vLLM with it), and every command that installs it
    must say --no-build-isolation."""
    import importlib.util

    from spin_fast.config import ModelConfig

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [req for reqs in extras.values() for req in reqs if req.startswith("flash-attn")], extras
    commands = [c for c in re.findall(r"`([^`]*pip install[^`]*)`", (ROOT / "README.md").read_text()) if "flash" in c]
    assert commands and all("--no-build-isolation" in command for command in commands), commands
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
        with pytest.raises(ValueError, match="pip install flash-attn --no-build-isolation"):
            ModelConfig(attention="flash_attention_2")
