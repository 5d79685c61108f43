"""The tree is the architecture: layers import downward only, across layers only through a
sub-package's ``__init__``, with no import cycle; no module is over 450 lines; the top-level API
stays small; every docstring example runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import attnpatch

ROOT = Path(attnpatch.__file__).parent

#: Sub-package (or utility module) -> layer. A module may import from lower layers and from its
#: own sub-package; never from a higher layer or from another sub-package of its own layer.
LAYERS = {
    "errors": 0,
    "_version": 0,
    "_util": 0.5,
    "images": 0.75,
    "families": 0.9,
    "hooks": 1,
    "diffusion": 2,
    "losses": 2,
    "patch": 2,
    "data": 2,
    "viz": 2,
    "models": 3,
    "training": 4,
    "cli": 5,
    "__main__": 5,
}
UTILITIES = {name for name, layer in LAYERS.items() if layer < 1}
#: ``attnpatch.testing`` is the model layer's tiny builders under the name users know.
ALIASES = {"testing": "models"}
MAX_LINES = 450


def _modules() -> list[str]:
    names = ["attnpatch"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="attnpatch."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.is_file() else (ROOT / rel).with_suffix(".py")


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported attnpatch module, at module level?, line)`` for every import in ``module``."""
    path = _path(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("attnpatch"):
                continue
            # `from . import losses` imports the sub-module itself; `from .hooks import hijack`
            # the function that the package's __init__ put in place of the module's name
            package_mod = importlib.import_module(target)
            subs = [
                f"{target}.{a.name}"
                for a in node.names
                if isinstance(getattr(package_mod, a.name, None), types.ModuleType)
                or (not hasattr(package_mod, a.name) and _path(f"{target}.{a.name}").is_file())
            ]
            for t in subs or [target]:
                out.append((t, id(node) in top_level, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnpatch"):
                    out.append((alias.name, id(node) in top_level, node.lineno))
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: its sub-package, or the top-level module itself."""
    parts = module.split(".")
    return ALIASES.get(parts[1], parts[1]) if len(parts) > 1 else "attnpatch"


def _surfaces(unit: str) -> set[str]:
    """The modules through which other layers import ``unit``: its package (and aliases)."""
    return {f"attnpatch.{unit}"} | {f"attnpatch.{a}" for a, u in ALIASES.items() if u == unit}


MODULES = _modules()


def test_every_module_is_assigned_a_layer():
    assert {_unit(m) for m in MODULES} - {"attnpatch"} <= set(LAYERS)
    assert LAYERS["hooks"] < LAYERS["diffusion"] < LAYERS["models"] < LAYERS["training"]


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_downward_through_public_surfaces(module):
    unit = _unit(module)
    bad = []
    for target, _, line in _imports(module):
        other = _unit(target)
        if unit == "attnpatch" or other == unit:
            continue  # the top-level API may use every surface; a sub-package its own modules
        where = f"{module}:{line} imports {target}"
        if other == "attnpatch":
            bad.append(f"{where} (the top-level package: import the module that defines it)")
        elif LAYERS[other] >= LAYERS[unit]:
            bad.append(f"{where} (layer {LAYERS[other]} from layer {LAYERS[unit]})")
        elif other not in UTILITIES and target not in _surfaces(other):
            bad.append(f"{where} (past the surface attnpatch.{other})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_level():
    graph = {m: {t for t, top, _ in _imports(m) if top and t in MODULES} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", MODULES)
def test_no_module_over_the_line_limit(module):
    n = len(_path(module).read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it where it holds more than one job"


def test_top_level_api_is_small_and_complete():
    assert len(attnpatch.__all__) <= 26
    for name in attnpatch.__all__:
        assert hasattr(attnpatch, name), name
    public = {n for n in vars(attnpatch) if not n.startswith("_")}
    subpackages = {"families", "hooks", "diffusion", "losses", "patch", "data", "models"}
    subpackages |= {"training", "viz"}
    assert public - set(attnpatch.__all__) <= subpackages | {"errors", "images", "testing", "cli"}


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, registries):  # a doctest may register a name
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
