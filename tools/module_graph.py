"""How the package's modules import each other: edges, circles, private names crossing modules.

Reads ``skltransfer/*.py`` with :mod:`ast` (nothing is imported or run) and
counts every import of one of the package's modules by another, at module
level or inside a function (a deferred import is still a dependency):

* **edges**: importer -> imported module pairs;
* **circles**: groups of modules that reach each other through imports
  (strongly connected components of more than one module), each printed
  with the edges that close it;
* **private imports**: ``from .module import _name`` across modules, which
  makes a name private in its module but public in practice;
* **layers**: the longest import chain once circles are merged;
* **lines**: of each module, and of ``FineTuneClassifier.fit`` (the
  estimator that is to stay thin).

Usage: ``python tools/module_graph.py [--package DIR] [--json]`` (default: this
checkout's ``skltransfer/``; another checkout's to compare).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "skltransfer"


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, deferred) for each package import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        deferred = id(node) not in module_level
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                target = node.module.split(".")[0]
            elif node.level == 1:  # from . import name
                for alias in node.names:
                    found.append((alias.name, [], deferred))
                continue
            elif node.module and node.module.split(".")[0] == "skltransfer":
                parts = node.module.split(".")
                if len(parts) == 1:
                    found.append(("__init__", [a.name for a in node.names], deferred))
                    continue
                target = parts[1]
            else:
                continue
            found.append((target, [a.name for a in node.names], deferred))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "skltransfer":
                    found.append((parts[1] if len(parts) > 1 else "__init__", [], deferred))
    return found


def graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    modules = {p.stem for p in package.glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for path in sorted(package.glob("*.py")):
        for target, names, _ in imports(path):
            if target not in modules or target == path.stem:
                continue
            if path.stem == "__init__":  # the root's lazy table is not a dependency of the layers
                continue
            edges[path.stem].add(target)
            private += [(path.stem, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    return edges, private


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layers(edges: dict[str, set[str]], groups: list[list[str]]) -> int:
    where = {m: m for m in edges}
    for group in groups:
        for m in group:
            where[m] = group[0]
    merged: dict[str, set[str]] = {}
    for m, targets in edges.items():
        merged.setdefault(where[m], set()).update(where[t] for t in targets if where[t] != where[m])
    depth: dict[str, int] = {}

    def level(v):
        if v not in depth:
            depth[v] = 1 + max((level(w) for w in merged.get(v, ())), default=0)
        return depth[v]

    return max(level(v) for v in merged)


def fit_lines(package: Path) -> int | None:
    """Lines of ``FineTuneClassifier.fit``, from ``def`` to its last statement, docstring included."""
    tree = ast.parse((package / "finetune.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "FineTuneClassifier":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "fit":
                    return item.end_lineno - item.lineno + 1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, default=PACKAGE, help="the package folder to read")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    edges, private = graph(args.package)
    groups = circles(edges)
    summary = {
        "modules": len(edges),
        "edges": sum(len(t) for t in edges.values()),
        "layers": layers(edges, groups),
        "circles": [{"modules": g, "edges": sorted(f"{a} -> {b}" for a in g for b in edges[a] if b in g)}
                    for g in groups],
        "private_imports": [f"{a} imports {b}.{n}" for a, b, n in sorted(private)],
        "lines": {p.stem: len(p.read_text().splitlines()) for p in sorted(args.package.glob("*.py"))},
        "finetune_fit_lines": fit_lines(args.package),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['modules']} modules, {summary['edges']} import edges, {summary['layers']} layers")
    print(f"{len(groups)} import circles")
    for circle in summary["circles"]:
        print(f"  {', '.join(circle['modules'])}: {'; '.join(circle['edges'])}")
    print(f"{len(private)} private names imported across modules")
    for line in summary["private_imports"]:
        print(f"  {line}")
    print(f"FineTuneClassifier.fit: {summary['finetune_fit_lines']} lines; modules: "
          + ", ".join(f"{m} {n}" for m, n in summary["lines"].items()))


if __name__ == "__main__":
    main()
