"""What a process computes once and keeps — an installed-package scan, a plugin's source digest, a
file's hash, an lm-eval task index — made here, so that every such memo is known and ``clear_all()``
resets them together (tests; a notebook whose files changed under a running kernel).

A memo belongs only where recomputing costs a user time in every cell or command (each use says
what it saves); it never holds a result: losing it costs time, never a number.
"""

from __future__ import annotations

import functools
from typing import Callable

_CLEARS: list[Callable[[], None]] = []


def memo(fn):
    """``functools.cache``, known to ``clear_all``."""
    cached = functools.cache(fn)
    _CLEARS.append(cached.cache_clear)
    return cached


def memo_dict() -> dict:
    """A dict a module keeps its memo in, known to ``clear_all``."""
    kept: dict = {}
    _CLEARS.append(kept.clear)
    return kept


def on_clear(clear: Callable[[], None]) -> Callable[[], None]:
    """Register what forgets a memo kept some other way (a plugin's store in memory)."""
    _CLEARS.append(clear)
    return clear


def clear_all() -> None:
    """Forget every memo of this process."""
    for clear in _CLEARS:
        clear()
