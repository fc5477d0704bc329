"""The run store: every file of a run folder, named in this one place.

::

    runs/<recipe>/
      recipe.toml               the recipe last run here
      shared/                   what the run's cells share (the teacher cache)
      cells/<cell id>/          one cell: see CellFiles

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
from qcompare.record import CellRecord, Items, read_record

RECIPE = "recipe.toml"
ITEMS_FORMAT = 2
CELLS = "cells"
SHARED = "shared"


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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _items_json(items) -> dict:
    if isinstance(items, list):
        return {"ids": [f"#{i}" for i in range(len(items))], "metrics": {"": items}}
    out = {"ids": list(items.ids), "metrics": {k: list(v) for k, v in items.metrics.items()}}
    if items.weights is not None:
        out["weights"] = list(items.weights)
    return out


class CellFiles:
    """The files of one cell folder (``cells/<id>/``); plugins reach them through ``CellContext``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    settings = property(lambda self: self.folder / "settings.json", doc="the cell's resolved settings")
    result = property(lambda self: self.folder / "result.json", doc="the cell's record, written last")
    items = property(lambda self: self.folder / "items.json", doc="per-item scores, for paired comparisons")
    train_log = property(lambda self: self.folder / "train_log.jsonl", doc="loss per logged step")
    cost = property(lambda self: self.folder / "cost.json", doc="wall time per phase, tokens, FLOPs, memory")
    traceback = property(lambda self: self.folder / "traceback.txt", doc="why the cell failed")
    output_log = property(lambda self: self.folder / "output.log",
                          doc="what libraries printed while the cell ran (progress bars, warnings, logs)")
    probe = property(lambda self: self.folder / "probe.safetensors",
                     doc="the converted model's probe logits (qcompare.checks.Fingerprint), for reload checks")
    model = property(lambda self: self.folder / "model", doc="the converted model (save_models = true)")
    checkpoints = property(lambda self: self.folder / "checkpoints", doc="a trainer's checkpoints while it runs")
    tensorboard = property(lambda self: self.folder / "tensorboard", doc="TensorBoard events (report_to)")

    def read_record(self) -> CellRecord | None:
        """The stored record, None if there is none yet (or a crash left none)."""
        try:
            raw = read_json(self.result)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return read_record(raw, self.result)

    def write_items(self, items: dict) -> None:
        """Per-item scores (``qcompare.api.Items`` per task; a plain list is one unnamed metric)."""
        write_json(self.items, {"format": ITEMS_FORMAT, "tasks": {t: _items_json(v) for t, v in items.items()}})

    def read_items(self):
        """Task → ``Items``, or None if the cell kept none. Items of first-build runs (a list per task)
        come back with positional ids ``#0, #1, …`` and one unnamed metric ``""``."""
        if not self.items.is_file():
            return None
        raw = read_json(self.items)
        if raw.get("format") == ITEMS_FORMAT:
            return {t: Items(v["ids"], v["metrics"], v.get("weights")) for t, v in raw["tasks"].items()}
        return {t: Items([f"#{i}" for i in range(len(v))], {"": v}) for t, v in raw.items()}

    def read_train_log(self) -> list[dict]:
        return read_jsonl(self.train_log) if self.train_log.is_file() else []


class RunStore:
    """One run folder: ``recipe.toml``, ``shared/`` and ``cells/<cell id>/``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise QcompareError(f"output path {self.root} is a file; give a folder path")

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def shared(self) -> Path:
        """Where the run's cells keep what they share (caches), across processes."""
        return self.root / SHARED

    def init(self, recipe_text: str) -> None:
        (self.root / CELLS).mkdir(parents=True, exist_ok=True)
        write_atomic(self.recipe, recipe_text)

    def cell(self, cell_id: str) -> CellFiles:
        return CellFiles(self.root / CELLS / cell_id)

    def cell_dir(self, cell_id: str) -> Path:
        return self.cell(cell_id).folder

    def cell_ids(self) -> list[str]:
        cells = self.root / CELLS
        return sorted(p.name for p in cells.iterdir() if p.is_dir()) if cells.is_dir() else []

    def result(self, cell_id: str) -> CellRecord | None:
        return self.cell(cell_id).read_record()

    def records(self) -> Iterator[CellRecord]:
        """Every stored cell record, teacher rows first, in a stable order."""
        rows = [r for cid in self.cell_ids() if (r := self.result(cid)) is not None]
        rows.sort(key=lambda r: (not r.is_teacher, r.label))
        return iter(rows)


def open_run(path: str | Path) -> RunStore:
    """A run folder for reading; a clear error if it isn't one."""
    root = Path(path)
    if not (root / CELLS).is_dir():
        raise QcompareError(f"{root} is not a qcompare run folder (no {CELLS}/ inside); give the folder `qcompare run` wrote")
    return RunStore(root)
