"""portvlm's folders import each other in one direction only: no folder-level import cycle.

An AST scan of every module under portvlm/ (function-level imports included: a lazy import is still a
dependency). A node is a top-level module or subpackage of portvlm (``portvlm.run.cell`` → ``run``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "portvlm"


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "portvlm":
        return None
    return parts[1] if len(parts) > 1 else "portvlm"


def _imports(path: Path, root: Path) -> set[str]:
    """Every portvlm module ``path`` imports (``from portvlm import x``: ``portvlm.x`` when x is a module)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            if n.module == "portvlm":
                for a in n.names:
                    is_module = (root / a.name).is_dir() or (root / f"{a.name}.py").is_file()
                    out.add(f"portvlm.{a.name}" if is_module else "portvlm")
            else:
                out.add(n.module)
    return out


def folder_graph(root: Path = PKG) -> dict[str, set[str]]:
    """``{node: nodes it imports}`` over portvlm/ (self-edges dropped)."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        me = _node(".".join(parts))
        edges = graph.setdefault(me, set())
        for module in _imports(path, root):
            other = _node(module)
            if other is not None and other != me:
                edges.add(other)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (empty = acyclic)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_folder_level_import_cycle():
    graph = folder_graph()
    assert {"run", "suites", "shims", "matrix", "platform"} <= set(graph), sorted(graph)
    found = cycles(graph)
    assert not found, "folder-level import cycles: " + "; ".join(" → ".join(c) for c in found)


def test_the_scan_sees_a_cycle(tmp_path):
    """Negative control: two folders importing each other, lazily on one side, are reported."""
    pkg = tmp_path / "portvlm"
    for name, body in (("a", "from portvlm.b import x\n"), ("b", "def f():\n    import portvlm.a.mod\n")):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text(body)
    (pkg / "__init__.py").write_text("")
    assert cycles(folder_graph(pkg)) == [["a", "b", "a"]]
