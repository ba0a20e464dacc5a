"""The import rules between the project's packages, checked by walking every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "client", "corpora", "device", "emofed", "models", "policy", "privacy", "server", "simulations")

# package -> project packages it must never import (anywhere in the module).
FORBIDDEN = {
    "models": set(PACKAGES) - {"models"},
    "privacy": set(PACKAGES) - {"privacy"},
    "emofed": set(PACKAGES) - {"emofed", "models", "privacy"},
    "server": {"client", "device", "cli", "simulations"},
    "policy": {"client", "server", "simulations", "device", "cli"},
    "device": {"client", "server", "simulations", "cli"},
    "client": {"server", "cli"},
    "corpora": {"client", "server", "device", "policy", "cli", "simulations"},
    "simulations": {"server", "cli"},
}
# What a real device runs may import the simulations only inside a function (simulation only).
NO_MODULE_LEVEL = {"client": {"simulations"}, "device": {"simulations"}, "policy": {"simulations"}}
# emofed.config may be imported by models/ and privacy/ ("except the configuration").
ALLOWED_GROUND = {"models": {"emofed.config"}, "privacy": {"emofed.config"}}


def _imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) for every absolute import of the tree."""
    found: list[tuple[str, int, bool]] = []
    top = {id(node) for node in tree.body}

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level and (id(child) in top or isinstance(child, ast.If | ast.Try))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, level))
            visit(child, level)

    visit(tree, True)
    return found


def _violations() -> list[str]:
    errors: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for module, line, module_level in _imports(tree):
                target = module.split(".")[0]
                if target == package or target not in PACKAGES:
                    continue
                where = f"{path.relative_to(ROOT)}:{line} imports {module}"
                if module in ALLOWED_GROUND.get(package, set()) or any(
                    module.startswith(g + ".") for g in ALLOWED_GROUND.get(package, set())
                ):
                    continue
                if target in FORBIDDEN.get(package, set()):
                    errors.append(f"{where}: {package}/ must not import {target}/")
                elif module_level and target in NO_MODULE_LEVEL.get(package, set()):
                    errors.append(f"{where}: {package}/ runs on real devices; import {target}/ inside a function")
    return errors


def test_packages_follow_the_layering() -> None:
    """No package imports a layer it must not (the rules above; see README, Architecture)."""
    errors = _violations()
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("package", ["client", "server", "policy", "device", "cli", "corpora"])
def test_package_init_imports_nothing_heavy(package: str) -> None:
    """Package ``__init__`` files have no side effects: they import no project module."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    imported = [m for m, _, _ in _imports(tree) if m.split(".")[0] in PACKAGES and m.split(".")[0] != package]
    assert not imported, f"{package}/__init__.py imports {imported}"


def test_the_layering_check_catches_a_violation(tmp_path: Path) -> None:
    """The walker sees imports inside functions and at module level alike."""
    tree = ast.parse("import os\nfrom server.app import app\n\ndef f():\n    from simulations.users import x\n")
    assert [(m, lvl) for m, _, lvl in _imports(tree)] == [("os", True), ("server.app", True), ("simulations.users", False)]
