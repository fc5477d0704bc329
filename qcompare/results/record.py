"""The cell record: what a cell's ``result.json`` holds, typed, with a schema version.

Everything that reads results (the report, the notebook API, trackers, export) reads them
through ``CellRecord``; the runner is the only writer. Records of older schema versions are
read as they are (missing fields take their defaults); a record this version of qcompare
does not know says how to go on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from qcompare.errors import QcompareError

# 1: the first build's records (no schema_version field; size held the nominal bits per weight).
# 2: schema_version, checks, plugins, measured sizes, logical and spent cost.
# 3: files (size and digest of each file the cell wrote), so a damaged or changed one is noticed.
SCHEMA_VERSION = 3


class ChoiceSettings(BaseModel):
    """One plugin with the parameters a cell's result depends on."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    params: dict[str, Any] = {}


class CellSettings(BaseModel):
    """What a cell's result depends on; its id is a hash of exactly this (``Cell.settings``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    quantizer: ChoiceSettings | None = None
    distiller: ChoiceSettings | None = None
    seed: int | None = None
    data: dict[str, Any] | None = None
    evaluators: list[dict[str, Any]] = []


class CellRecord(BaseModel):
    """One cell's result: status, metrics ± stderr, size, cost, checks and where it came from."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    id: str
    label: str = ""
    settings: CellSettings
    status: Literal["running", "done", "failed"]
    error: str | None = None
    # for a failed cell: whether running the recipe again can end otherwise (a process killed, memory
    # or disk short) or not (a seeded, deterministic failure: the recipe or a plugin must change)
    rerun_helps: bool | None = None
    started_at: str | None = None
    finished_at: str | None = None
    recipe: dict[str, Any] | None = None  # {"text", "overrides"}: what produced the cell
    data_source: dict[str, Any] | None = None  # where the training data was read from
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    groups: dict[str, list[str]] = {}
    group_weighting: dict[str, str] = {}  # group -> "equal" (mean of subtasks) or "size" (pooled items)
    size: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    notes: dict[str, Any] = {}  # what plugins said about how the cell ran (CellContext.notes)
    plugins: dict[str, Any] = {}
    save_error: str | None = None
    provenance: dict[str, Any] = {}
    # what the run estimated the cell would cost before it ran (qcompare.engine.estimate): flops, seconds
    estimate: dict[str, Any] = {}
    # every file the cell wrote beside this record (items, probe logits, training log, the saved model's
    # files), by its path in the cell folder: {"bytes", "sha256", "mtime_ns"} (qcompare.results.store.file_digests)
    files: dict[str, dict[str, Any]] = {}

    @property
    def is_teacher(self) -> bool:
        return self.settings.quantizer is None

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_json(self) -> dict[str, Any]:
        """The dict written as ``result.json`` (and handed to ``cell_finished`` hooks)."""
        out = self.model_dump(mode="json")
        # optional top-level fields appear only when set; settings keep their Nones (the id hashes them)
        return {k: v for k, v in out.items() if k == "settings" or v not in (None, {})}


@dataclass
class Items:
    """Per-item scores of one task, for comparing cells item by item.

    ``ids`` name the items stably across runs and machines (a document id and a hash of the
    document: a reordered or edited task file then pairs only the items that are the same);
    ``metrics`` maps each metric the task reports (``acc``, ``acc_norm``, ``kl``) to one score per
    item; ``weights`` (optional) make the task's value a ratio, Σ w·x / Σ w (per-token KL over
    documents of different lengths: the tokens)."""

    ids: list[str]
    metrics: dict[str, list[float]]
    weights: list[float] | None = None



def read_record(raw: Any, where: Path | str = "result.json") -> CellRecord:
    """A stored record as a CellRecord, whatever schema version wrote it."""
    if not isinstance(raw, dict):
        raise QcompareError(f"{where}: not a qcompare cell record (a JSON {type(raw).__name__}); "
                            "delete the cell folder and run the recipe again")
    version = raw.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise QcompareError(f"{where}: written by a newer qcompare (record schema {version}; this one reads up to "
                            f"{SCHEMA_VERSION}); upgrade qcompare to read it")
    if version == 1 and isinstance(raw.get("size"), dict):
        # schema 1 stored the quantizer's nominal width as bits_per_weight and the bytes held in memory
        old = raw["size"]
        raw = {**raw, "size": {"nominal_bits": old.get("bits_per_weight"), "memory_bytes": old.get("storage_bytes")}}
    try:
        return CellRecord.model_validate({**raw, "schema_version": version})
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(map(str, first["loc"])) or "(record)"
        raise QcompareError(f"{where}: not a readable cell record ({field}: {first['msg'].lower()}); "
                            "delete the cell folder and run the recipe again to rewrite it") from None


def load_record(path: Path) -> CellRecord:
    return read_record(json.loads(Path(path).read_text()), path)
