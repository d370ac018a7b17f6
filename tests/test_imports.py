"""The project's import graph, read from the source with `ast` (imports inside functions included):
no cycle among its modules, and the layering of docs/design.md (`ldm` -> `models`, `samplers`, `weights`;
samplers know no model and no file format; weights know no model class; models know no file format)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "models", "samplers", "weights")
SCRIPTS = "tools"  # scripts that put tools/ on sys.path and import each other by bare name
MODEL_CLASSES = {"models.unet", "models.vae", "models.clip_text", "models.openclip_text"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [p for top in (*PACKAGES, SCRIPTS) for p in sorted((ROOT / top).rglob("*.py"))]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file: `from pkg import sub` is an edge to the
    submodule when there is one, else to the package (its __init__ runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages above this module's own
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if name.startswith(f"{SCRIPTS}.") and f"{SCRIPTS}.{target}" in modules:
                target = f"{SCRIPTS}.{target}"  # `from make_checkpoint import ...` inside tools/
            while target and target not in modules:  # `import models.unet.X` -> the deepest module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_as_python_resolves_it(graph):
    # the resolution rules themselves, on imports known to be in the tree
    assert "ldm.device" in graph["ldm.loading"]             # from .device import ...
    assert "ldm.pipeline" in graph["ldm.generate"]          # from . import pipeline
    assert "weights" in graph["ldm.loading"]                # from weights import ... (the package)
    assert "tools.make_checkpoint" in graph["tools.bench_networks"]  # a bare-name import inside a function
    assert "models.unet" in graph["tools.bench_networks"]


def test_find_cycle_reports_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _violations(graph, package: str, forbidden) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, targets in graph.items()
                  if src == package or src.startswith(f"{package}.")
                  for dst in targets if forbidden(dst))


def _in(*packages: str):
    return lambda dst: dst.split(".")[0] in packages


@pytest.mark.parametrize("package, forbidden, why", [
    ("samplers", _in("models", "weights", "ldm"), "a sampler never imports a model, a file format or ldm"),
    ("weights", lambda dst: _in("ldm")(dst) or dst in MODEL_CLASSES, "weights know no ldm and no model class"),
    ("models", _in("ldm", "weights"), "models know no file format and no ldm"),
])
def test_layering(graph, package, forbidden, why):
    assert _violations(graph, package, forbidden) == [], why
