"""The package's structure as its users' contract describes it: no import cycle at run
time, and no file operation of its own in the engine (files are the backends' and the
host layer's work). The layers themselves are import-linter's contract in CI."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parent.parent / "src" / "virtstore"

# os functions that touch files: the engine reaches them through virtstore.host.
FILE_CALLS = {"open", "read", "write", "pread", "pwrite", "unlink", "remove", "rename",
              "replace", "link", "symlink", "mkdir", "makedirs", "rmdir", "listdir",
              "scandir", "stat", "lstat", "fstat", "chmod", "chown", "fsync", "fdatasync",
              "ftruncate", "truncate", "close", "lseek", "sendfile", "copy_file_range",
              "posix_fallocate", "utime"}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # Imports inside functions count: they run. Imports for type checkers alone do not.
    graph = grimp.build_graph("virtstore", exclude_type_checking_imports=True)
    assert len(graph.modules) > 100
    assert _cycles(graph) == []


def test_a_cycle_would_be_found() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_the_engine_does_no_file_operation_of_its_own() -> None:
    calls = []
    for path in sorted((SRC / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
                    and node.func.attr in FILE_CALLS):
                calls.append(f"{path.name}:{node.lineno}: os.{node.func.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "open":
                calls.append(f"{path.name}:{node.lineno}: open")
    assert calls == []
