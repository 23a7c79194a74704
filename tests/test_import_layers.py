"""The package's imports (read from the source, every import statement, module level or not): no import circles, and
the lower layers (the hot path, the methods, the benchmark packages) never import the layers that drive them (the
pipeline, sweep, report and the tools built on results)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LOWER = ("engine", "scheduler", "multiturn", "attention", "cache", "ragged", "decoding", "methods", "ruler",
         "longbench", "needle", "longgen")
UPPER = ("pipeline", "sweep", "report", "summary", "sample_scores", "eval", "compare", "multirun", "slurm")


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """kvbench module -> the kvbench modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    paths = {_module(p): p for p in (SRC / "kvbench").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "kvbench.cache" in graph["kvbench.attention"] and "kvbench.methods.base" in graph["kvbench.attention"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_lower_layers_never_import_upper_ones():
    layer = lambda module: module.split(".")[1] if module.count(".") else ""
    upward = {module: sorted(t for t in targets if layer(t) in UPPER)
              for module, targets in import_graph().items() if layer(module) in LOWER}
    assert {module: up for module, up in upward.items() if up} == {}


def unused_imports() -> dict[str, list[str]]:
    """Per module (a package's `__init__` aside: its imports are what it exports or registers), the names it imports
    and never uses."""
    found = {}
    for path in sorted((SRC / "kvbench").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = [alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "") != "__future__"
                    for alias in node.names if alias.name != "*"]
        notes = [getattr(node, key, None) for node in ast.walk(tree) for key in ("annotation", "returns")]
        strings = [note.value for note in notes if isinstance(note, ast.Constant) and isinstance(note.value, str)]
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {word for text in strings for word in re.findall(r"[A-Za-z_]\w*", text)}
        unused = sorted(set(imported) - used)
        if unused:
            found[_module(path)] = unused
    return found


def test_no_module_imports_a_name_it_does_not_use():
    assert unused_imports() == {}


def test_the_report_names_no_benchmark():
    """The report asks each benchmark's class (`kvbench.benchmark.Benchmark`: table layout, extra tables, figures)
    and the published numbers' data for what is particular to it: no benchmark's name is written in its code
    (docstrings aside), and no report module imports a benchmark's package (its task names, abbreviations and
    buckets are the class's `table_layout`, `abbreviations` and `group_table`)."""
    names = {"longbench", "longbench_e", "needle", "ruler", "longgen"}
    graph = import_graph()
    packages = {module: sorted(t for t in targets if t.split(".")[1] in names)
                for module, targets in graph.items() if module.startswith("kvbench.report")}
    assert {module: found for module, found in packages.items() if found} == {}
    found = {}
    for path in sorted((SRC / "kvbench" / "report").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        named = sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                        and node.value in names and id(node) not in docs})
        if named:
            found[_module(path)] = named
    assert found == {}
