"""Only `petals_protocol.p2p.compat` may touch py-libp2p's private names.

A private name used anywhere else would break at import, or silently, on the next libp2p release,
without the version check and stock fallback that the compat package gives. The check reads the
source: an import of an underscored libp2p name, or an attribute `obj._name` whose name our own
code never defines (so it can only belong to a dependency) in a module that uses libp2p, outside the compat
package fails.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "petalsd", "client")
COMPAT = ROOT / "protocol" / "p2p" / "compat"


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if ".venv" not in p.parts]


def _own_private_names(trees: dict[Path, ast.AST]) -> set[str]:
    """Underscored names our code defines: methods, functions, classes, attributes it assigns."""
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, (ast.AnnAssign, ast.Assign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                own.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return {name for name in own if name.startswith("_")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_libp2p_private_names_only_in_compat() -> None:
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in _sources()}
    outside = {path: tree for path, tree in trees.items() if COMPAT not in path.parents}
    own = _own_private_names(outside)
    problems: list[str] = []
    for path, tree in outside.items():
        where = path.relative_to(ROOT)
        uses_libp2p = "libp2p" in path.read_text()  # other dependencies' internals have their own checks
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libp2p"):
                parts = (node.module or "").split(".")
                names = [alias.name for alias in node.names]
                if any(_private(part) for part in parts) or any(_private(n) for n in names):
                    problems.append(f"{where}:{node.lineno}: from {node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("libp2p") and any(_private(p) for p in alias.name.split(".")):
                        problems.append(f"{where}:{node.lineno}: import {alias.name}")
            elif uses_libp2p and isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                problems.append(f"{where}:{node.lineno}: .{node.attr}")
    assert not problems, "libp2p private names outside protocol/p2p/compat:\n" + "\n".join(problems)


def test_the_check_sees_compat_uses() -> None:
    """The compat package does use private names (so the check above is not vacuous)."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(COMPAT.glob("*.py"))}
    attrs = {node.attr for tree in trees.values() for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and _private(node.attr)}
    assert {"_store_at_peer", "_get_from_peer", "_read_data_body"} <= attrs
