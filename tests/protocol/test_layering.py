"""The layering ARCHITECTURE.md states, checked on the sources' imports.

- wire core (`protocol/*.py`): the standard library, msgpack, cryptography, base58 and each
  other; no torch, transformers, trio or libp2p (sans-IO: bytes in, typed messages out).
- models (`protocol/models/`): the core plus torch, transformers, safetensors, huggingface_hub;
  never trio, libp2p or p2p (a span runs the same in a test, a daemon or a notebook).
- p2p (`protocol/p2p/`): the core plus trio and libp2p; never torch, transformers or models.
- `petalsd` and `petals_client` may use all three; neither imports the other.

Module-level imports count (those under `if TYPE_CHECKING:` do not); an import inside a
function is a deliberate lazy dependency and is listed in LAZY.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "protocol"

HEAVY = {"torch", "transformers", "safetensors", "huggingface_hub", "trio", "libp2p", "multiaddr"}
RULES: dict[str, tuple[set[str], set[str]]] = {
    # layer: (forbidden third-party roots, forbidden petals_protocol subpackages)
    "core": (HEAVY, {"models", "p2p"}),
    "models": ({"trio", "libp2p", "multiaddr"}, {"p2p"}),
    "p2p": ({"torch", "transformers", "safetensors", "huggingface_hub"}, {"models"}),
    "petalsd": (set(), {"petals_client"}),
    "client": (set(), {"petalsd"}),
}
#: Function-level imports that cross a layer on purpose: (file, module) -> why.
LAZY = {
    ("protocol/tensors.py", "torch"): "from_torch/to_torch: the wire format itself never needs torch",
    ("protocol/threads.py", "torch"): "set_torch_threads only: the rest must run before torch is imported",
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] == "protocol":
        return rel[1] if len(rel) > 2 else "core"
    return rel[0]


def _imports(tree: ast.Module, path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, at module level) of every import."""
    package = ".".join(["petals_protocol", *path.relative_to(PROTOCOL).parts[:-1]]) if PROTOCOL in path.parents else ""
    found: list[tuple[int, str, bool]] = []
    top: set[int] = set()

    def module_level(nodes: list[ast.stmt]) -> None:  # not inside functions, not TYPE_CHECKING
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                module_level(node.orelse)
                continue
            top.add(id(node))
            for field in ("body", "orelse", "finalbody", "handlers"):
                module_level(getattr(node, field, []))

    module_level(tree.body)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            names = [module]
        found += [(node.lineno, name, id(node) in top) for name in names]
    return found


def _violation(layer: str, module: str) -> str | None:
    roots, subpackages = RULES.get(layer, (set(), set()))
    parts = module.split(".")
    if parts[0] in roots:
        return f"{parts[0]} in the {layer} layer"
    if parts[0] == "petals_protocol" and len(parts) > 1 and parts[1] in subpackages:
        return f"petals_protocol.{parts[1]} from the {layer} layer"
    if parts[0] in subpackages:
        return f"{parts[0]} from {layer}"
    return None


def test_layers_import_only_what_they_may() -> None:
    problems = []
    for folder in ("protocol", "petalsd", "client"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            layer = _layer(path)
            for line, module, top in _imports(ast.parse(path.read_text()), path):
                why = _violation(layer, module)
                if why and (top or (rel, module.split(".")[0]) not in LAZY):
                    problems.append(f"{rel}:{line}: imports {module} ({why})")
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_the_check_catches_a_crossing() -> None:
    tree = ast.parse("import trio\nfrom ..p2p import host\n")
    path = PROTOCOL / "models" / "example.py"
    found = [_violation("models", module) for _line, module, _top in _imports(tree, path)]
    assert found == ["trio in the models layer", "petals_protocol.p2p from the models layer"]
