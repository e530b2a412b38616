"""The codebase's structural rules, checked on the source (docs/ARCHITECTURE.md, "Rules of the codebase")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# module name → file, with the repo's convert/ shipped as mlx_med.convert (pyproject package-dir)
SOURCES = {
    **{".".join(p.relative_to(REPO).with_suffix("").parts): p for p in (REPO / "mlx_med").rglob("*.py")},
    **{"mlx_med.convert." + p.stem: p for p in (REPO / "convert").glob("*.py")},
}
SOURCES = {name.removesuffix(".__init__"): path for name, path in SOURCES.items()}
SUBPACKAGES = {"adapters", "chat", "commands", "convert", "data", "evaluation", "pipeline", "serve", "train"}
MAX_LINES = 400


def imports(path: Path, module: str, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(imported mlx_med module, names taken from it) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("mlx_med")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_med"):
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in SOURCES]
            found += [(m, []) for m in submodules] or [(node.module, names)]
    return found


def test_every_module_is_small():
    too_long = {name: n for name, path in SOURCES.items()
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_shared_modules_never_import_a_subpackage():
    shared = [name for name in SOURCES if name.count(".") == 1 and name != "mlx_med.cli"]
    assert "mlx_med.backend" in shared and "mlx_med.io" in shared
    upward = {(name, target) for name in shared for target, _ in imports(SOURCES[name], name)
              if target.split(".")[1:2] and target.split(".")[1] in SUBPACKAGES}
    assert not upward, f"shared modules importing a stage: {sorted(upward)}"


def test_no_module_imports_another_modules_private_names():
    private = {(name, f"{target}.{n}") for name, path in SOURCES.items() for target, names in imports(path, name)
               for n in names if n.startswith("_") and not n.endswith("__") and target != name}
    assert not private, f"private names imported across modules: {sorted(private)}"


def test_module_level_imports_have_no_cycles():
    graph = {name: {t for t, _ in imports(path, name, top_level_only=True) if t in SOURCES and t != name}
             for name, path in SOURCES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and nxt != "mlx_med":  # every module's parent package runs first
                pytest.fail(f"import cycle: {' → '.join([*stack[stack.index(nxt):], nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
