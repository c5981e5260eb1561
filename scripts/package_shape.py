"""The shape of the rnnlm package, as a newcomer reading the import graph would see it: modules per folder, the
largest module and class, the imports between rnnlm modules (and how many sit inside functions), import cycles
(strongly connected modules, counting every import) and the depth of the import graph.

    python scripts/package_shape.py [PACKAGE_DIR]      # default: rnnlm/ beside this script

Read from the source with ``ast`` (nothing is imported), so an older checkout can be measured the same way.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The rnnlm module an imported name belongs to (``rnnlm.a.b.C`` -> ``rnnlm.a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import of an rnnlm module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for n in names:
                target = resolve(n, modules) if n.startswith("rnnlm") else None
                if target:
                    found.append((target, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def walk(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                walk(w)
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
    for v in graph:
        if v not in index:
            walk(v)
    return out


def depth(graph: dict[str, set[str]]) -> int:
    memo: dict[str, int] = {}

    def d(v: str, seen: frozenset) -> int:
        if v in memo:
            return memo[v]
        result = 1 + max((d(w, seen | {v}) for w in graph[v] if w not in seen), default=0)
        memo[v] = result
        return result

    return max(d(v, frozenset()) for v in graph)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "rnnlm"
    files = sorted(root.rglob("*.py"))
    trees = {module_name(root, p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in files}
    modules = set(trees)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edges, inside = 0, 0
    for m, (_, tree) in trees.items():
        for target, in_function in imports(tree, modules):
            if target == m or (m == "rnnlm" and target != m):  # the package's own re-exports are not a layer
                continue
            edges += 1
            inside += in_function
            graph[m].add(target)
    folders = Counter(str(p.parent.relative_to(root.parent)) for p in files if p.name != "__init__.py")
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, (p, _) in trees.items()}
    classes = [(n.end_lineno - n.lineno + 1, f"{m}.{n.name}") for m, (_, t) in trees.items()
               for n in ast.walk(t) if isinstance(n, ast.ClassDef)]
    cycles = strongly_connected(graph)
    print(f"modules per folder: {dict(sorted(folders.items()))}")
    print(f"lines in the package: {sum(sizes.values()):,}")
    largest = max(sizes, key=sizes.get)
    lines, name = max(classes)
    print(f"largest module: {largest} ({sizes[largest]} lines); largest class: {name} ({lines} lines)")
    print(f"imports between rnnlm modules: {edges} ({inside} inside functions); "
          f"module pairs: {sum(len(v) for v in graph.values())}")
    print(f"import cycles: {len(cycles)} {cycles if cycles else ''}")
    print(f"levels (longest import chain, modules): {depth(graph)}")


if __name__ == "__main__":
    main()
