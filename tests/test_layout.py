"""The layout's rules, checked on the source: the library never reaches into the application
layer, the core never reaches up into methods or deployment, no module imports another's private
names, and ``import hwprune`` does not pull in the application layer's dependencies."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hwprune"

# Core modules: the three axes' shared vocabulary. They may import each other and nothing above.
CORE = {"errors", "files", "structures", "targets", "schedules", "parametrize", "hardware",
        "distributed"}
ABOVE_CORE = {"methods", "deploy", "storage", "report", "app", "models", "data", "training"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        yield path, parts


def _imported(path: Path, parts: tuple[str, ...]):
    """(absolute dotted module under hwprune, imported names) for each ``from ... import``."""
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
        elif node.module and node.module.split(".")[0] == "hwprune":
            target = node.module.split(".")[1:]
        else:
            continue
        yield target, [a.name for a in node.names]


def _where(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def test_the_library_never_imports_the_application_layer():
    offenders = [
        f"{_where(path)} imports hwprune.{'.'.join(target)}"
        for path, parts in _modules() if parts[0] not in ("app", "__main__")
        for target, _ in _imported(path, parts) if target[:1] == ["app"]
    ]
    assert offenders == []


def test_the_core_imports_nothing_above_it():
    offenders = [
        f"{_where(path)} imports hwprune.{'.'.join(target)}"
        for path, parts in _modules() if len(parts) == 1 and parts[0] in CORE
        for target, _ in _imported(path, parts) if target[:1] and target[0] in ABOVE_CORE
    ]
    assert offenders == []


def test_no_module_imports_private_names_of_another():
    offenders = []
    for path, parts in _modules():
        for target, names in _imported(path, parts):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{_where(path)}: {', '.join(private)} from {'.'.join(target)}")
            # a private module (storage/_bits.py) serves its own package only
            for i, part in enumerate(target):
                if part.startswith("_") and not part.startswith("__") and \
                        list(parts[:i]) != target[:i]:
                    offenders.append(f"{_where(path)} imports the private module "
                                     f"{'.'.join(target[:i + 1])}")
    assert offenders == []


@pytest.mark.parametrize("heavy", ["yaml", "rich", "matplotlib"])
def test_import_hwprune_does_not_load_the_application_dependencies(heavy):
    code = f"import sys, hwprune; sys.exit(1 if {heavy!r} in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"`import hwprune` imported {heavy}: {done.stderr}"
