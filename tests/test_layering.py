"""The package layering (DESIGN.md) holds: import-linter's contracts in pyproject.toml are kept, they name every
core module, and no module imports another module's private name."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("codec", "datasets_tools", "benchmarks")
ABOVE_THE_CORE = ("cli", "generation", "training")


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_contracts_are_kept():
    """`lint-imports` counts imports inside functions too, so a lazy import cannot hide a wrong direction."""
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(_contracts())} kept, 0 broken" in r.stdout


def test_the_core_contract_names_every_core_module():
    core = next(c for c in _contracts() if c["name"].startswith("The codec core"))
    found = {f"codec.{p.stem if p.is_file() else p.name}" for p in (ROOT / "codec").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__")
             or (p.is_dir() and (p / "__init__.py").exists() and p.name not in ABOVE_THE_CORE)}
    assert found == set(core["source_modules"])


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_name():
    """What two modules share is public in its proper home (a test may still reach into a private name)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                ours = target.split(".")[0] in PACKAGES
                if ours and alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name} from {target}")
    assert not found, "\n".join(found)
