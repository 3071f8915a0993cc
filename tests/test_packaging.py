"""The package installs like one: a wheel carries every recipe, preset and data config, and loads them without the
source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_loads_every_recipe(tmp_path):
    """Recipes were found only next to a source checkout: `pip install .` then `load_recipe("infonce")` failed."""
    source = tmp_path / "source"  # a copy: the build writes build/ beside it, and must not reuse an earlier one
    shutil.copytree(ROOT / "icon_lightning", source / "icon_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheel_command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*wheel_command, "-w", tmp_path / "dist", source], check=True, capture_output=True, cwd=source)
    (wheel,) = (tmp_path / "dist").glob("icon_lightning-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("icon_lightning/configs/")}
    expected = {f"icon_lightning/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert expected and shipped == expected  # recipes, presets and data configs, nothing missing
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    script = (
        "import icon_lightning, icon_lightning.recipes as r; "
        "print(icon_lightning.__file__); names = r.recipe_names(); "
        "print(len(names), sum(type(r.load_recipe(n)).__name__ != '' for n in names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # not the checkout: nothing can come from the source tree
        env={**os.environ, "PYTHONPATH": str(site)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    assert out[0].startswith(str(site))  # the installed copy, not the editable checkout
    recipes = len(list((ROOT / "configs" / "recipes").glob("*.yaml")))
    assert out[1] == f"{recipes} {recipes}"
