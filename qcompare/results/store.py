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
from dataclasses import dataclass
from typing import Any, Iterator

from qcompare.errors import QcompareError
from qcompare.results.record import CellRecord, Items, read_record

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


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Size, SHA-256 and modification time of each file under ``paths`` (files, or folders taken whole),
    keyed by its path relative to ``folder``: what a cell record keeps of the files beside it."""
    out = {}
    for path in paths:
        for f in sorted([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if f.is_file():
                stat = f.stat()
                out[f.relative_to(folder).as_posix()] = {"bytes": stat.st_size, "sha256": _sha256(f),
                                                         "mtime_ns": stat.st_mtime_ns}
    return out


def changed_files(folder: Path, digests: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The files of ``digests`` that are gone or differ now, each with its phrase ("model/model.safetensors:
    812 bytes, not 4,096"). A file whose size and modification time are as recorded is taken as it was; one
    whose time moved (copied, touched) is hashed."""
    problems = {}
    for name, was in digests.items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            problems[name] = f"{name}: missing"
            continue
        if stat.st_size != was["bytes"]:
            problems[name] = f"{name}: {stat.st_size:,} bytes, not {was['bytes']:,}"
        elif stat.st_mtime_ns != was.get("mtime_ns") and _sha256(path) != was["sha256"]:
            problems[name] = f"{name}: its contents changed (SHA-256 differs)"
    return problems


@dataclass
class CellState:
    """What a cell folder holds: its record if readable, and what is damaged in it, by file: the record
    itself (``record`` None) or files the record names (the record stands)."""

    id: str
    label: str
    record: CellRecord | None
    damage: dict[str, str]  # the damaged file (its path in the cell folder) -> what is wrong, one phrase

    @property
    def problems(self) -> list[str]:
        return list(self.damage.values())

    @property
    def damaged(self) -> bool:
        return bool(self.damage)


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
                     doc="the converted model's probe logits (qcompare.sdk.checks.Fingerprint), for reload checks")
    model = property(lambda self: self.folder / "model", doc="the converted model (save_models = true)")
    checkpoints = property(lambda self: self.folder / "checkpoints", doc="a trainer's checkpoints while it runs")
    tensorboard = property(lambda self: self.folder / "tensorboard", doc="TensorBoard events (report_to)")

    def read_record(self) -> CellRecord | None:
        """The stored record, None if there is none yet or it cannot be read (``inspect`` says why)."""
        return self.inspect(verify=False).record

    def inspect(self, verify: bool = True) -> CellState:
        """The cell's record and what is damaged in its folder: a ``result.json`` that is unreadable (not
        UTF-8, not JSON, not a record) or missing where the cell had started (``settings.json`` is written
        just before it), and, with ``verify``, a file the record names that is gone or changed."""
        label = self.folder.name
        try:
            settings = read_json(self.settings)
            label = _settings_label(settings)
        except (OSError, ValueError):
            settings = None
        name = self.result.name

        def unreadable(what: str) -> CellState:
            return CellState(self.folder.name, label, None, {name: f"{name}: {what}"})

        try:
            raw = json.loads(self.result.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            if settings is None:  # a cell not started yet
                return CellState(self.folder.name, label, None, {})
            return unreadable("missing (deleted, or the cell was stopped as it started)")
        except UnicodeDecodeError as e:
            return unreadable(f"not UTF-8 text (byte {e.start})")
        except json.JSONDecodeError as e:
            return unreadable(f"not valid JSON ({e.msg} at line {e.lineno}: truncated?)")
        except OSError as e:
            return unreadable(f"unreadable ({e.strerror})")
        try:
            record = read_record(raw, self.result)
        except QcompareError as e:
            if "newer qcompare" in str(e):
                raise
            return unreadable(str(e).split(": ", 1)[-1])
        damage = changed_files(self.folder, record.files) if verify and record.done else {}
        return CellState(record.id, record.label or label, record, damage)

    def write_items(self, items: dict) -> None:
        """Per-item scores (``qcompare.sdk.api.Items`` per task; a plain list is one unnamed metric)."""
        write_json(self.items, {"format": ITEMS_FORMAT, "tasks": {t: _items_json(v) for t, v in items.items()}})

    def read_items(self):
        """Task → ``Items``, or None if the cell kept none. Items of first-build runs (a list per task)
        come back with positional ids ``#0, #1, …`` and one unnamed metric ``""``. A damaged file is a
        QcompareError naming it and the cure."""
        if not self.items.is_file():
            return None
        try:
            raw = json.loads(self.items.read_bytes().decode("utf-8"))
            if raw.get("format") == ITEMS_FORMAT:
                return {t: Items(list(v["ids"]), dict(v["metrics"]), v.get("weights")) for t, v in raw["tasks"].items()}
            return {t: Items([f"#{i}" for i in range(len(v))], {"": list(v)}) for t, v in raw.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # not UTF-8, not JSON, not items
            raise QcompareError(f"{self.items} is damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                                "run the recipe again: it recomputes the cell (the damaged file is kept aside)") from None

    def set_aside(self, names: list[str]) -> list[str]:
        """Move each damaged file (or folder) among ``names`` to ``<name>.damaged`` (replacing an earlier
        one), so a rerun writes afresh and nothing is lost; return what was moved where."""
        import shutil

        moved = []
        for name in dict.fromkeys(names):
            path = self.folder / name
            if not path.exists():
                continue
            aside = path.with_name(path.name + ".damaged")
            if aside.is_dir():
                shutil.rmtree(aside)
            elif aside.exists():
                aside.unlink()
            path.rename(aside)
            moved.append(f"{name} → {aside.name}")
        return moved

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
        """Every readable cell record, teacher rows first, in a stable order (``damaged`` names the rest)."""
        rows = [r for cid in self.cell_ids() if (r := self.result(cid)) is not None]
        rows.sort(key=lambda r: (not r.is_teacher, r.label))
        return iter(rows)

    def damaged(self, verify: bool = True) -> list[CellState]:
        """The cells whose folder is damaged: an unreadable or missing record, or (``verify``) a file
        their record names that is gone or changed."""
        return [st for cid in self.cell_ids() if (st := self.cell(cid).inspect(verify)).damaged]


def open_run(path: str | Path) -> RunStore:
    """A run folder for reading; a clear error if it isn't one."""
    root = Path(path)
    if not (root / CELLS).is_dir():
        raise QcompareError(f"{root} is not a qcompare run folder (no {CELLS}/ inside); give the folder `qcompare run` wrote")
    return RunStore(root)


def _settings_label(settings: dict) -> str:
    """A cell's label from its ``settings.json``, by plugin names (what a damaged record no longer says)."""
    if not settings.get("quantizer"):
        return f"{settings.get('model')} · teacher"
    seed = "" if settings.get("seed") is None else f" · seed {settings['seed']}"
    distiller = (settings.get("distiller") or {}).get("name", "")
    return f"{settings.get('model')} · {settings['quantizer']['name']} · {distiller}{seed}"
