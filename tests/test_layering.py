"""The package's layering (docs/design.md, "Layout"): every import points down, the CLI is a leaf.

Units are the top-level modules and subpackages of masked_ops (``cli``, ``dataset``, ``explain``, ...).
Imports are read from the source with ``ast``, including those inside functions, which is where a
circle hides when it would fail at import time. ``__main__`` modules are entry points (run, never
imported), so they may call the CLI.
"""
import ast
import collections
import pathlib

import masked_ops

ROOT = pathlib.Path(masked_ops.__file__).parent


def _unit(module: str):
    parts = module.split(".")
    if parts[0] != "masked_ops" or len(parts) == 1:
        return None
    return parts[1] if (ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists() else None


def _imported(node: ast.AST, package: str):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # "from . import x" and "from masked_ops import x" import the unit x itself
        if node.module is None or module == "masked_ops":
            return [f"{module}.{a.name}" for a in node.names]
        return [module]
    return []


def unit_imports():
    """{(from unit, to unit): ["file:line", ...]} over every module except __main__ modules."""
    edges = collections.defaultdict(list)
    for path in ROOT.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module[: -len(".__init__")]
        source = _unit(module) if path.name != "__init__.py" else _unit(package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, package):
                unit = _unit(target)
                if unit is not None and source is not None and unit != source:
                    edges[(source, unit)].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


def _cycles(edges):
    graph = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_imports_inside_functions():
    # an independent reason: explain/strategies imports masks at the top, dataset/explain imports models
    # inside a method; both must be seen, or an empty graph would pass the tests below
    edges = unit_imports()
    assert ("explain", "masks") in edges
    assert ("dataset", "models") in edges
    assert _cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]


def test_no_import_circle_between_units():
    edges = unit_imports()
    cycles = _cycles(edges)
    detail = {c: [(a, b, edges[(a, b)][:3]) for a in c for b in c if (a, b) in edges] for c in map(tuple, cycles)}
    assert not cycles, f"import circles between units of masked_ops: {detail}"


def test_nothing_outside_the_cli_imports_the_cli():
    offenders = {a: where for (a, b), where in unit_imports().items() if b == "cli"}
    assert not offenders, f"only the command line may import masked_ops.cli: {offenders}"


def test_helpers_import_nothing_above_them():
    # _util is the bottom of the application layer; runs sits on it alone
    edges = unit_imports()
    assert not [b for (a, b) in edges if a == "_util"], [(a, b, w) for (a, b), w in edges.items() if a == "_util"]
    assert {b for (a, b) in edges if a == "runs"} <= {"_util"}
