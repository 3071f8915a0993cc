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
import yaml

ROOT = Path(__file__).resolve().parents[1]


def defined_at(class_path: str) -> str:
    """Where the class a YAML ``class_path`` names is defined (a package may re-export it under a shorter path)."""
    import importlib

    module, name = class_path.rsplit(".", 1)
    found = getattr(importlib.import_module(module), name)
    return f"{found.__module__}.{found.__name__}"


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
        "path = lambda o: f'{type(o).__module__}.{type(o).__name__}'; "
        "loaded = {n: r.load_recipe(n) for n in names}; "
        "print(' '.join(f'{n}={path(o)},{path(getattr(o, \"p\", None))},{path(getattr(o, \"q\", None))}' "
        "for n, o in loaded.items()))"
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
    expected = {}  # each recipe's objective, p and q classes as its YAML names them
    for path in sorted((ROOT / "configs" / "recipes").glob("*.yaml")):
        loss = yaml.safe_load(path.read_text())["model"]["loss"]
        sides = [(loss.get("init_args") or {}).get(side, {}) for side in ("p", "q")]
        paths = [loss["class_path"], *(side.get("class_path", "types.NoneType") for side in sides)]
        expected[path.stem] = ",".join(defined_at(p) for p in paths)
    loaded = dict(item.split("=", 1) for item in out[1].split())
    assert loaded == expected and len(expected) >= 10
