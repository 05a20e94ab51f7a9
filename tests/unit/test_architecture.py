"""How the code hangs together: no import cycles, one backend seam, lint clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = (
    "bench",
    "collators",
    "data",
    "models",
    "optimizers",
    "run",
    "tools",
    "torchprime",
    "trainers",
)
MODULES = ("train.py", "train_config.py")


def project_modules() -> dict[str, Path]:
    """Dotted name → file of every module of the project (tests excluded)."""
    found = {path.stem: ROOT / path for path in map(Path, MODULES)}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions (a lazy import
    still ties the two modules together)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                imported.add(name)
    return imported


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_through_others():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert len(graph) > 60  # the whole project was read
    assert "run.preflight" in graph["run.training"]  # and the edges are real
    assert cycles(graph) == []


def test_only_torchprime_imports_torch_xla():
    for name, path in project_modules().items():
        if name.split(".")[0] == "torchprime":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "torch_xla" for n in names), (name, names)


#: torch.distributed's parallel APIs: the torch.distributed engine's, behind the backend seam.
PARALLEL_APIS = (
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.device_mesh",
    "torch.distributed._composable",
)


def test_only_torchprime_imports_the_parallel_apis_of_torch_distributed():
    importers = set()
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n.startswith(PARALLEL_APIS) for n in names):
                importers.add(name)
    assert importers == {"torchprime.backend.distributed"}


def test_ruff_finds_nothing_to_fix_or_reformat():
    for command in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
