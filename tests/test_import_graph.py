"""No import cycle inside core: the ``lmport`` package (core/) and its builtin plugins (plugins/).

The graph is read from the source with :mod:`ast`, never by importing. Only imports that run when
a module is imported count: statements at module level, including those inside module-level
``if``/``try``/``with`` blocks, but not those under ``if TYPE_CHECKING:`` and not those inside
functions or methods. A function-level import runs when the function is called, after every
module involved has finished importing, so it cannot leave a module half-initialised; lmport uses
them on purpose to defer heavy or optional work (``PretrainedConfig.from_pretrained`` reaching
``lmport.auto``, the registry loading builtin plugins), and they are not cycles in the sense that
matters here.

Edges are the explicit ones: ``from .x import y`` is an edge to ``lmport.x`` (and to ``lmport.x.y``
where ``y`` is a submodule). The implicit import of a module's parent packages is not an edge, as in
import-linter; otherwise every module would form a cycle with ``lmport/__init__.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Package name -> its source folder (pyproject.toml's package-dir mapping).
PACKAGES = {"lmport": ROOT / "core", "lmport.plugins": ROOT / "plugins"}
ARCHITECTURE_PACKAGES = ("lmport_llama", "lmport_gpt2", "lmport_mistral")


def module_files(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``packages``."""
    nested = {folder.resolve() for folder in packages.values()}
    out: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            if any(other != folder.resolve() and other in path.resolve().parents for other in nested):
                continue  # a folder mapped to its own package name
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (see the module docstring)."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)


def import_graph(packages: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports at import time."""
    files = module_files(packages)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in import_time_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(graph: Mapping[str, set[str]], cycle: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(t for t in graph[m] if t in cycle))}" for m in cycle)


def test_core_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGES)
    assert len(graph) > 40 and "lmport.modeling.base" in graph and "lmport.plugins.attention" in graph
    assert "lmport.config" in graph["lmport.modeling.decoder"]  # the analysis sees relative imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in core:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_core_imports_no_architecture_by_name() -> None:
    """Core and its builtin plugins never import a first-party architecture package, even inside a function."""
    offenders = []
    for name, path in module_files(PACKAGES).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ARCHITECTURE_PACKAGES]
    assert not offenders


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {"pkg": root}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "from .b import x\n", "b.py": "from . import a\n"}, [["pkg.a", "pkg.b"]]),
        (
            {"a.py": "import pkg.sub.c\n", "sub/__init__.py": "", "sub/c.py": "from ..a import y\n"},
            [["pkg.a", "pkg.sub.c"]],
        ),
        (
            {"a.py": "try:\n    from .b import x\nexcept ImportError:\n    pass\n", "b.py": "from .a import y\n"},
            [["pkg.a", "pkg.b"]],
        ),
        ({"a.py": "def f():\n    from .b import x\n", "b.py": "from .a import y\n"}, []),  # deferred: not a cycle
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n",
                "b.py": "from .a import y\n",
            },
            [],
        ),
        ({"a.py": "from .b import x\n", "b.py": "from .c import y\n", "c.py": ""}, []),
    ],
    ids=["relative", "absolute-and-parent", "in-try", "function-level", "type-checking", "chain"],
)
def test_cycle_detection(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    assert find_cycles(import_graph(_package(tmp_path, files))) == expected


#: The most lines a core module may have ("one home per job").
MAX_CORE_LINES = 400
#: Modules allowed over the limit (none: every core module has one job).
OVER_THE_LIMIT_WHILE_BEING_SPLIT: frozenset[str] = frozenset()


def test_no_core_module_is_over_the_line_limit() -> None:
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted((ROOT / "core").rglob("*.py"))
    }
    assert len(sizes) > 40
    over = {name: n for name, n in sizes.items() if n > MAX_CORE_LINES and name not in OVER_THE_LIMIT_WHILE_BEING_SPLIT}
    assert not over, f"core modules over {MAX_CORE_LINES} lines: {over}"


def _hook_calls(tree: ast.AST) -> Iterator[str]:
    """Names of ``<anything>.hook.lmport_<name>(...)`` calls: asking pluggy a hook directly."""
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and func.attr.startswith("lmport_"):
            if isinstance(func.value, ast.Attribute) and func.value.attr == "hook":
                yield func.attr


def test_only_the_hooks_module_asks_the_hooks() -> None:
    """One typed wrapper per hook (``lmport.hooks``), one policy for a ``None`` answer: nothing else in core calls
    ``registry.hook.lmport_*`` itself (plugins, builtin ones included, are free to)."""
    callers = {
        name: sorted(set(_hook_calls(ast.parse(path.read_text(encoding="utf-8"), str(path)))))
        for name, path in module_files({"lmport": PACKAGES["lmport"]}).items()
    }
    assert {"lmport_resolve_source", "lmport_open_weights", "lmport_select_attention"} <= set(callers["lmport.hooks"])
    assert {name: calls for name, calls in callers.items() if calls and name != "lmport.hooks"} == {}
