"""One error vocabulary: every error kind a row can carry is declared once, in operators/columns.py,
with its meaning, and documented in the README.

The kinds a module can produce are found in its source (ast): string literals such as
"text_missing" handed to an error constructor (ImageError, _RowError, PromptError, ColumnProblem,
Result), or assigned to a name about kinds (kind, error_kind, kinds[...], COLUMN_TYPE = ...). A
new kind written anywhere in model/, operators/ or pipeline/ without its declaration fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from operators import columns as C

REPO = Path(__file__).resolve().parents[2]
KIND_LIKE = re.compile(r"^[a-z]+(_[a-z0-9]+)+$")
ERROR_CONSTRUCTORS = {"ImageError", "_RowError", "PromptError", "ColumnProblem", "Result"}


def _name(node: ast.AST) -> str:
    """The name a target or callee stands for: x, x[...] and obj.x all give "x"."""
    while isinstance(node, (ast.Subscript, ast.Starred)):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _is_about_kinds(node: ast.AST, parents: dict) -> bool:
    """Whether the literal `node` is an error kind by where it stands (see the module docstring)."""
    for _ in range(4):
        node = parents.get(node)
        if node is None:
            return False
        if isinstance(node, ast.Call):  # an argument: a kind only when the call makes an error
            return _name(node.func) in ERROR_CONSTRUCTORS
        if isinstance(node, ast.keyword) and node.arg and "kind" in node.arg.lower():
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        names = [_name(e) for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
        if any("kind" in n.lower() for n in names):
            return True
    return False


def produced_kinds() -> dict[str, set[str]]:
    """kind -> the files whose code can produce it: as a literal where kinds stand, or through a
    constant of operators/columns.py (C.DUPLICATE_ID). The declaration itself is not a producer."""
    found: dict[str, set[str]] = {}
    for path in sorted(p for d in ("model", "operators", "pipeline") for p in (REPO / d).glob("*.py")):
        if path == REPO / "operators" / "columns.py":
            continue
        tree = ast.parse(path.read_text())
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            kind = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and KIND_LIKE.match(node.value):
                kind = node.value if _is_about_kinds(node, parents) else None
            elif isinstance(node, ast.Attribute) and _name(node.value) in ("C", "columns"):
                value = getattr(C, node.attr, None)
                kind = value if isinstance(value, str) and value in C.ERROR_KINDS else None
            if kind:
                found.setdefault(kind, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_kind_a_module_produces_is_declared_with_its_meaning():
    produced = produced_kinds()
    # The scan sees the producers it should (a scan that finds nothing would pass anything).
    for kind in ("image_decode", "text_missing", "out_of_memory", "column_type", "duplicate_id", "model_error",
                 "prompt_images"):
        assert kind in produced, kind
    undeclared = {k: sorted(v) for k, v in produced.items() if k not in C.ERROR_KINDS}
    assert not undeclared, f"error kinds produced but not declared in operators/columns.py: {undeclared}"
    for kind, meaning in C.ERROR_KINDS.items():
        assert len(meaning.split()) >= 4, kind


def test_every_declared_kind_is_produced_and_documented():
    produced = produced_kinds()
    readme = (REPO / "README.md").read_text()
    for kind in C.ERROR_KINDS:
        assert kind in produced, f"{kind} is declared but nothing produces it"
        assert f"`{kind}`" in readme, f"{kind} is not documented in README.md"
