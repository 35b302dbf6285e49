"""The checkout's layout: Python started anywhere in it imports the standard library, not a folder."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flags", [["-S"], ["-I"], []], ids=["no-site", "isolated", "plain"])
def test_python_at_the_repository_root_imports_the_standard_library(flags: list[str]) -> None:
    # -S: no site-packages and no editable-install hooks that could import the real module first
    code = "import collections, operator, sys; assert hasattr(operator, 'itemgetter'), operator.__file__"
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_top_level_folder_is_an_importable_package() -> None:
    assert not (REPO / "__init__.py").exists()
    packages = [p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert packages == []


def test_every_source_tree_maps_into_the_modelpress_namespace() -> None:
    assert (REPO / "runner" / "src" / "modelpress" / "__init__.py").is_file()
    assert (REPO / "operator" / "src" / "modelpress" / "operator" / "__init__.py").is_file()
    assert not (REPO / "operator" / "src" / "modelpress" / "__init__.py").exists(), "one modelpress package, defined once"
