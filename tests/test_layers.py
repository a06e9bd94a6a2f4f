"""The import graph of src/fedloom against the layer list in docs/architecture.md: every
package sits in one layer, no import reaches a higher layer, no two packages import each
other (directly or round about), no module imports another module's private name, and
no module is longer than 450 lines nor any class longer than 250.

Imports under ``if TYPE_CHECKING:`` are left out (they never run); imports inside a
function count like any other. The templates' own task files (folders named like
``breast-cancer``, copied into a user's workspace) are not modules of the package."""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def layers_from_doc(text: str) -> dict[str, int]:
    """``{package: layer}`` from the fenced ``layers`` block: one layer a line, lowest
    first, ``N name: package package ...``."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    found: dict[str, int] = {}
    for line in block.group(1).splitlines():
        number, _, packages = re.fullmatch(r"(\d+) ([\w-]+):(.*)", line.strip()).groups()  # type: ignore[union-attr]
        for package in packages.split():
            assert package not in found, f"{package} is in two layers"
            found[package] = int(number)
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """``fedloom.aggregator.loop`` -> ``aggregator``; ``fedloom`` -> ``fedloom``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@functools.cache
def import_graph() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Edges between packages (with the modules that make each) and private-name imports."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    private: list[str] = []
    for path in sorted((SRC / "fedloom").rglob("*.py")):
        if any("-" in part for part in path.relative_to(SRC).parts):
            continue  # a template's task file, not a module of the package
        module = module_name(path)
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level or not (node.module or "").startswith("fedloom"):
                    continue
                targets = [node.module or ""]
                private += [
                    f"{module} imports {alias.name} from {node.module}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
            else:
                targets = [a.name for a in node.names if a.name.startswith("fedloom")]
            for target in targets:
                edges[(package_of(module), package_of(target))].append(f"{module} -> {target}")
    return edges, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_round_about_and_none_in_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_the_layer_list_is_read_from_its_block() -> None:
    doc = "x\n```layers\n1 core: core\n2 parts: plan runtime\n```\n"
    assert layers_from_doc(doc) == {"core": 1, "plan": 2, "runtime": 2}


def test_every_package_is_in_one_layer_of_the_doc() -> None:
    layers = layers_from_doc(DOC.read_text())
    edges, _ = import_graph()
    packages = {p for edge in edges for p in edge} | {
        package_of(module_name(p))
        for p in (SRC / "fedloom").rglob("*.py")
        if not any("-" in part for part in p.relative_to(SRC).parts)
    }
    assert sorted(packages - set(layers)) == [], "place these in docs/architecture.md's layers"
    assert sorted(set(layers) - packages) == [], "the doc names packages that do not exist"


def test_no_import_reaches_a_higher_layer() -> None:
    layers = layers_from_doc(DOC.read_text())
    edges, _ = import_graph()
    upward = [
        f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]}): {sorted(set(made))[:3]}"
        for (a, b), made in sorted(edges.items())
        if layers[a] < layers[b]
    ]
    assert upward == []


def test_no_cycle_between_packages() -> None:
    edges, _ = import_graph()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        if a != b:
            graph[a].add(b)
    assert cycles(graph) == []


def test_no_module_imports_another_modules_private_name() -> None:
    _, private = import_graph()
    assert private == []


def test_no_module_over_450_lines_and_no_class_over_250() -> None:
    too_long = []
    for path in sorted((SRC / "fedloom").rglob("*.py")):
        if any("-" in part for part in path.relative_to(SRC).parts) or "proto" in path.parts:
            continue  # a template's task file; protobuf's generated code
        text = path.read_text()
        if text.count("\n") > 450:
            too_long.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 250:
                    too_long.append(f"{path.relative_to(SRC)}: class {node.name} {size} lines")
    assert too_long == []
