"""The dependency direction of the source tree, checked on every import statement.

Layers, bottom to top: the foundation (benchmark/core), the methods, the tasks (which see the
method contract only), the application (benchmark/*.py), dispatch (slurm/), and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmark", "methods", "tasks", "slurm")


def layer_of(module: str) -> str | None:
    """The layer a project module belongs to; None for anything outside the project."""
    if module == "benchmark.cli" or module.startswith("benchmark.cli."):
        return "cli"
    if module == "benchmark.core" or module.startswith("benchmark.core."):
        return "core"
    if module == "methods.base":
        return "contract"
    top = module.split(".")[0]
    return {"benchmark": "app", "methods": "methods", "tasks": "tasks", "slurm": "slurm"}.get(top)


# What each layer may import (itself included).
ALLOWED = {
    "core": {"core"},
    "contract": {"core", "contract", "methods"},
    "methods": {"core", "contract", "methods"},
    "tasks": {"core", "contract", "tasks"},
    "app": {"core", "contract", "methods", "tasks", "app"},
    "slurm": {"core", "contract", "methods", "tasks", "app", "slurm"},
    "cli": {"core", "contract", "methods", "tasks", "app", "slurm", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import, nested ones included; `from pkg import sub` counts as pkg.sub."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / candidate.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, candidate if is_module else base))
    return found


def edges() -> list[tuple[str, int, str, str, str]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = module_name(path)
            package_name = source if path.name == "__init__.py" else source.rpartition(".")[0]
            for line, target in imported(ast.parse(path.read_text(), str(path)), package_name):
                if layer_of(target) is not None:
                    out.append((str(path.relative_to(ROOT)), line, source, target, layer_of(source)))
    return out


def test_every_import_runs_down_the_layers():
    wrong = [
        f"{path}:{line}: {source} ({layer}) imports {target} ({layer_of(target)})"
        for path, line, source, target, layer in edges()
        if layer_of(target) not in ALLOWED[layer]
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_walk_sees_the_imports_it_judges():
    # A walker that found nothing would pass the test above vacuously.
    found = {(source, target) for _, _, source, target, _ in edges()}
    assert ("benchmark.runner", "methods") in found or any(
        s == "benchmark.runner" and t.startswith("methods") for s, t in found
    )
    assert any(s.startswith("tasks.") and t == "methods.base" for s, t in found)
    assert any(s.startswith("methods.") and t.startswith("benchmark.core") for s, t in found)
    assert layer_of("benchmark.core.data") == "core" and layer_of("benchmark.pretrain") == "app"
    assert layer_of("benchmark.cli.run") == "cli" and layer_of("benchmark.perf.suite") == "app"


def test_a_wrong_edge_is_reported(tmp_path):
    tree = ast.parse("from tasks.linear import LinearProbe\nimport slurm.sweep\n")
    targets = [t for _, t in imported(tree, "methods")]
    assert [layer_of(t) for t in targets] == ["tasks", "slurm"]
    assert all(layer_of(t) not in ALLOWED["methods"] for t in targets)
