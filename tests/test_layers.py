"""The three floors of DESIGN.md, "Layers": imports only point down, and there is one import name.

    core      crnet, crnet.config / errors / optional / device / checkpoint / ops / metrics / bundle,
              crnet.model, crnet.data: imports torch, numpy, Pillow and itself only
    deploy    crnet.export, crnet.engines: import the core (and each its own package), not each other
    commands  crnet.commands (and `python -m crnet`): may import anything

Checked twice: statically over every import statement in the source (function-level ones included), and
dynamically by importing the core in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# Source folders and the package each installs as.
PACKAGES = {REPO / "crnet": "crnet", REPO / "export": "crnet.export", REPO / "engines": "crnet.engines"}
CORE_EXTERNAL = {"torch", "numpy", "PIL"}  # besides the standard library


def floor(module: str) -> str:
    for name in ("commands", "export", "engines"):
        if module == f"crnet.{name}" or module.startswith(f"crnet.{name}."):
            return name
    return "commands" if module == "crnet.__main__" else "core"


ALLOWED = {
    "core": {"core"},
    "export": {"core", "export"},
    "engines": {"core", "engines"},
    "commands": {"core", "export", "engines", "commands"},
}


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([package, *parts])] = path
    return modules


def imported(path: Path, module: str) -> list[str]:
    """Every module an import statement in the file names (relative imports resolved)."""
    names = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from crnet import x` names crnet.x
    return names


MODULES = source_modules()


def test_every_source_file_is_a_module_of_the_crnet_package() -> None:
    assert "crnet.commands.cli" in MODULES and "crnet.engines.base" in MODULES
    assert "crnet.export.build" in MODULES and "crnet.model.crnet" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = floor(module)
    wrong = []
    for name in imported(MODULES[module], module):
        top = name.split(".")[0]
        if top in ("engines", "export"):
            wrong.append(f"{name} (the package installs as crnet.{top})")
        elif top == "crnet" and (name in MODULES or name.rsplit(".", 1)[0] in MODULES):
            target = name if name in MODULES else name.rsplit(".", 1)[0]
            if floor(target) not in ALLOWED[mine]:
                wrong.append(f"{name} ({floor(target)} floor)")
        elif mine == "core" and top not in {"crnet", *CORE_EXTERNAL, *sys.stdlib_module_names}:
            wrong.append(f"{name} (the core uses torch, numpy and Pillow only)")
    assert not wrong, f"{module} ({mine}) imports {', '.join(wrong)}"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_core_loads_nothing_above_it(tmp_path) -> None:
    core = sorted(name for name in MODULES if floor(name) == "core" and name != "crnet._C")
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {core!r}: importlib.import_module(name)",
            "above = sorted(m for m in sys.modules if m.startswith(('crnet.export', 'crnet.engines',"
            " 'crnet.commands')) or m.split('.')[0] in ('engines', 'export'))",
            "print(len(sys.modules)); print(above)",
        ]
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", ["engines", "export"])
def test_plain_names_do_not_import(name: str, tmp_path) -> None:
    """From any directory, `engines` and `export` are not modules: only crnet.engines and crnet.export are."""
    result = run_python(f"import crnet.{name}\nimport {name}", tmp_path)
    assert result.returncode != 0
    assert "No module named" in result.stderr or f"installs as crnet.{name}" in result.stderr
