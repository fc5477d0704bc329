"""The result store: ``runs/<recipe>/`` with a copy of the recipe and one folder per cell.

Results are plain JSON/JSONL written atomically (temporary file, then rename), and a cell's
``result.json`` is written last, so a crash or ``kill -9`` can lose at most the cell that
was running, never a stored one. (A cell's traceback and saved model are written before it.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qcompare.errors import QcompareError

RESULT = "result.json"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunStore:
    """One run folder: ``recipe.toml`` and ``cells/<cell id>/``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise QcompareError(f"output path {self.root} is a file; give a folder path")

    def init(self, recipe_text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cells").mkdir(exist_ok=True)
        write_atomic(self.root / "recipe.toml", recipe_text)

    def cell_dir(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def result(self, cell_id: str) -> dict | None:
        path = self.cell_dir(cell_id) / RESULT
        try:
            return read_json(path)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def records(self) -> Iterator[dict]:
        """Every stored cell result, teacher rows first, in a stable order."""
        cells = self.root / "cells"
        if not cells.is_dir():
            return iter(())
        rows = [r for d in sorted(cells.iterdir()) if (r := self.result(d.name)) is not None]
        rows.sort(key=lambda r: (r["settings"]["quantizer"] is not None, r.get("label", "")))
        return iter(rows)


def open_run(path: str | Path) -> RunStore:
    """A run folder for reading; a clear error if it isn't one."""
    root = Path(path)
    if not (root / "cells").is_dir():
        raise QcompareError(f"{root} is not a qcompare run folder (no cells/ inside); give the folder `qcompare run` wrote")
    return RunStore(root)
