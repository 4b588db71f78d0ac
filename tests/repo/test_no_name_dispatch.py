"""Code outside ``src/rankwise/adapters/`` never names a registered method: what a method has (an
allocator, a schedule, factors, ...) is declared by its module and read from there, so adding a
method is one file and a docs page. A string literal equal to a method's name is the sign of a
lookup by name (``table["gora"]``, ``if method == "dora"``); the few stated defaults that name a
method are listed below with the reason."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import rankwise
from rankwise.core import registry

SOURCE = Path(rankwise.__file__).parent
ADAPTERS = SOURCE / "adapters"

# (file under src/rankwise, method name) -> why that file may name the method.
ALLOWED = {
    ("bench/budget.py", "lora"): "the default budget is stated as LoRA's parameter count at rank 8",
    ("bench/runner.py", "lora"): "LoRA-Pro and LoRA+ are optimizers; their rows train LoRA, as their papers do",
    ("allocate/gora.py", "gora"): "the function gora() names itself in its argument errors",
    ("interop/formats.py", "bat"): "PEFT's own vocabulary: MissConfig(init_weights='bat')",
}


def _method_names() -> set[str]:
    """The methods rankwise ships (tests may register others for a while)."""
    return {
        name
        for name in registry.methods()
        if registry.get(name).module_class.__module__.startswith(f"{rankwise.__name__}.adapters.")
    }


def _literals(source: str) -> Iterator[ast.Constant]:
    """The string constants of ``source`` except docstrings (prose may mention a method) and
    ``__all__`` (it lists Python names, such as the function ``gora``)."""
    tree = ast.parse(source)
    skipped = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skipped.update(id(constant) for constant in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            yield node


def _names_used(source: str, names: set[str]) -> dict[str, list[int]]:
    """``{method name: line numbers}`` of the literals in ``source`` equal to one of ``names``."""
    found: dict[str, list[int]] = {}
    for node in _literals(source):
        if node.value in names:
            found.setdefault(node.value, []).append(node.lineno)
    return found


def test_the_scan_sees_a_lookup_by_name_and_not_prose() -> None:
    source = '''"""Runs lora, and dora."""
__all__ = ["lora"]
def recipe(method):
    """For lora."""
    table = {"lora": 1}
    return table["lora"] if method == "dora" else f"{method} is not lora"
'''
    assert _names_used(source, {"lora", "dora"}) == {"lora": [5, 6], "dora": [6]}


def test_no_code_outside_the_adapters_names_a_registered_method() -> None:
    names = _method_names()
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        if ADAPTERS in path.parents:
            continue
        file = path.relative_to(SOURCE).as_posix()
        for name, lines in _names_used(path.read_text(encoding="utf-8"), names).items():
            found[file, name] = lines
    unexplained = {
        f"{file}:{lines} names {name!r}" for (file, name), lines in found.items() if (file, name) not in ALLOWED
    }
    assert not unexplained, "declare the capability on the method instead: " + "; ".join(sorted(unexplained))
    stale = sorted(ALLOWED.keys() - found.keys())
    assert not stale, f"allowed names no longer used, remove them from ALLOWED: {stale}"
