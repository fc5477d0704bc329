"""qcompare's small cache of derived facts (``$QCOMPARE_CACHE`` or ``~/.cache/qcompare``): layout
checks and parameter counts from a model's config (qcompare.engine.structure), digests of local model
folders (qcompare.engine.provenance). One JSON file; losing it costs time, never a result."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_file() -> Path:
    base = os.environ.get("QCOMPARE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qcompare")
    return Path(base).expanduser() / "structure.json"


def read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(cache: dict) -> None:
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        cache_file().write_text(json.dumps(cache))
    except OSError:  # a read-only home costs the speed-up, nothing else
        pass
