"""The layout's rules, checked on the source: the library never reaches into the application
layer, the core never reaches up into methods or deployment, no module imports another's private
names, and ``import hwprune`` does not pull in the application layer's dependencies."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hwprune"

# The layers of docs/architecture.md: each top-level module or package, and what it may import.
LAYER = {
    **dict.fromkeys(["errors", "files", "structures", "targets", "schedules", "parametrize",
                     "relaxations", "hardware", "distributed"], "core"),
    "methods": "methods", "deploy": "deployment", "storage": "deployment", "report": "reporting",
    **dict.fromkeys(["models", "data", "training"], "zoo"), "app": "application",
    "integrations": "integrations",
}
MAY_IMPORT = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "deployment": {"core", "deployment"},
    "reporting": {"core", "deployment", "reporting"},
    "zoo": {"core", "methods", "zoo"},
    # the framework callbacks drive the library as a user's loop does
    "integrations": {"core", "methods", "deployment", "reporting", "zoo", "integrations"},
}
# The one reach sideways: the "map" structure's coupled feature maps are shrink's channel
# analysis (one union-find over the traced graph, not two), so methods may import
# hwprune.deploy.shrink and nothing else of deployment.
ALSO_MAY_IMPORT = {"methods": [("deploy", "shrink")],
                   # a recipe's method block means one thing everywhere: the recipe's reading
                   "integrations": [("app", "recipe")]}


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
        if target:
            yield target, [a.name for a in node.names]
        else:  # `from .. import methods`: each name is a module of the package
            for alias in node.names:
                yield [alias.name], [alias.name]


def _where(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def test_every_layer_imports_only_the_layers_below_it():
    offenders = []
    for path, parts in _modules():
        layer = LAYER.get(parts[0])
        if layer not in MAY_IMPORT:  # the application layer, hwprune/__init__, __main__
            continue
        for target, _ in _imported(path, parts):
            if any(tuple(target[:len(p)]) == p for p in ALSO_MAY_IMPORT.get(layer, ())):
                continue
            if target and target[0] in LAYER and LAYER[target[0]] not in MAY_IMPORT[layer]:
                offenders.append(f"{_where(path)} ({layer}) imports hwprune.{'.'.join(target)} "
                                 f"({LAYER[target[0]]})")
    assert offenders == []


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert names - {"__init__", "__main__"} == set(LAYER)


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


def test_nothing_imports_the_integrations():
    offenders = [f"{_where(path)} imports hwprune.{'.'.join(target)}"
                 for path, parts in _modules() if parts[0] != "integrations"
                 for target, _ in _imported(path, parts) if target[:1] == ["integrations"]]
    assert offenders == []


@pytest.mark.parametrize("heavy", ["yaml", "rich", "matplotlib", "lightning", "transformers"])
def test_import_hwprune_does_not_load_the_application_dependencies(heavy):
    code = f"import sys, hwprune; sys.exit(1 if {heavy!r} in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"`import hwprune` imported {heavy}: {done.stderr}"


def test_the_integrations_package_loads_no_framework():
    code = ("import sys, hwprune.integrations; found = [m for m in ('lightning', "
            "'transformers', 'yaml') if m in sys.modules]; sys.exit(','.join(found) or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"`import hwprune.integrations` imported {done.stderr}"
