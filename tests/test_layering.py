"""Imports point one way: maths → roles → data → classical clusterings → models and callbacks → baselines → CLI
(the one builder) → the estimator, the demo and sweeps → the `icon` command (README "Layout").

Read from the source with `ast` (every import, also those inside functions), so no import order or cache can hide
an edge."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icon_lightning"

# A module may import only from layers below its own. A new top-level module or subpackage must be placed here.
LAYER = {
    "functional": 0,
    "io": 0,
    "distributed": 0,
    "rows": 1,
    "divergence": 1,
    "metrics": 1,
    "runs": 1,
    "settings": 1,
    "supervisory": 2,
    "learned": 2,
    "loss": 3,
    "recipes": 4,
    "data": 4,
    "classical": 5,
    "models": 6,
    "callbacks": 6,
    "baselines": 7,
    "cli": 8,
    "estimator": 9,
    "demo": 9,
    "sweep": 9,
    "entry": 10,
    "__main__": 11,
}
CORE = ("functional", "rows", "divergence", "supervisory", "learned", "loss")
HEAVY = ("lightning", "wandb", "faiss")


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import in the package."""
    edges = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(module, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                edges.append((module, node.module))
    return edges


def test_every_import_points_down_the_layers():
    wrong = []
    for source, target in imports():
        if not target.startswith("icon_lightning.") or group(source) in ("__init__", group(target)):
            continue
        assert group(source) in LAYER and group(target) in LAYER, f"place {source} or {target} in LAYER"
        if LAYER[group(source)] <= LAYER[group(target)]:
            wrong.append(f"{source} imports {target}")
    assert not wrong, wrong


def test_data_never_imports_models_and_cli_never_imports_sweep():
    edges = {(group(s), group(t)) for s, t in imports() if t.startswith("icon_lightning.")}
    assert ("data", "models") not in edges and ("cli", "sweep") not in edges and ("models", "baselines") not in edges


def test_the_core_imports_no_lightning_wandb_or_faiss():
    heavy = [(s, t) for s, t in imports() if group(s) in CORE and t.split(".")[0] in HEAVY]
    assert not heavy, heavy


# ---------------------------------------------------------------------------------------------- sizes
ABOUT = 62  # "no class or function over about 60 lines": code lines (no docstrings, comments or blank lines), in
# the package, benchmarks/ and experiments/
# Measured ceilings of classes above it, so that they can only shrink: none is left. The Lightning surfaces (the
# DataModule, the module, the CLI, Convergence) fit it with their flat, annotated constructors (the `--data.*` /
# `--model.*` / `--convergence.*` keys) and their hooks; the work is in owned parts (README "Layout"): the
# DataModule's `ClusteringData`, the module's head bank and `Evaluation`, the CLI's run records, the `Verdict`.
LARGER: dict[str, int] = {}


def code_lines(node: ast.AST, source: list[str]) -> int:
    docstrings = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            if isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(node.lineno, node.end_lineno + 1)
    return sum(
        1 for i in lines if i not in docstrings and source[i - 1].strip() and not source[i - 1].strip().startswith("#")
    )


def test_no_class_or_function_is_over_about_sixty_lines():
    over = []
    outer = [p for folder in ("benchmarks", "experiments") for p in (PACKAGE.parent / folder).rglob("*.py")]
    for path in [*PACKAGE.rglob("*.py"), *outer]:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                size, limit = code_lines(node, text.splitlines()), LARGER.get(node.name, ABOUT)
                if size > limit:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    over.append(f"{where} {node.name} has {size} code lines (> {limit})")
    assert not over, over


def test_code_lines_counts_code_only():
    text = 'class A:\n    """Doc\n    string."""\n\n    # comment\n    def f(self):\n        """Doc."""\n'
    text += "        return 1\n"
    node = ast.parse(text).body[0]
    assert code_lines(node, text.splitlines()) == 3  # class A:, def f, return 1
