"""Process-wide memos are made in one place (qcompare.sdk.memo) and forgotten together."""

from __future__ import annotations

import ast
from pathlib import Path

from qcompare.sdk import clear_all, get_registry, memo, memo_dict, on_clear

ROOT = Path(__file__).resolve().parents[2]
# standalone public modules that import nothing of qcompare: their caches install patches once
STANDALONE = {"qcompare/compat.py", "qcompare/compat_scope.py"}


def test_clear_all_forgets_every_kind_of_memo_the_engine_and_plugins_keep():
    calls = []

    @memo
    def square(x):
        calls.append(x)
        return x * x

    kept, forgotten = memo_dict(), []
    on_clear(lambda: forgotten.append(True))
    assert square(3) == square(3) == 9 and calls == [3]
    kept["a"] = 1
    registry = get_registry()
    assert get_registry() is registry  # collected once per process
    clear_all()
    assert square(3) == 9 and calls == [3, 3] and kept == {} and forgotten == [True]
    assert get_registry() is not registry


def test_no_module_keeps_a_functools_cache_of_its_own():
    """A memo outside qcompare.sdk.memo would survive clear_all: tests and notebooks would see stale values."""
    found = []
    for path in sorted([*(ROOT / "qcompare").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in STANDALONE or rel == "qcompare/sdk/memo.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("cache", "lru_cache") and \
                    isinstance(node.value, ast.Name) and node.value.id == "functools":
                found.append(f"{rel}:{node.lineno}")
    assert not found, found
