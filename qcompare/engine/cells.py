"""The cross product: one Cell per (model, quantizer point, distiller point, seed).

A cell's id hashes its resolved settings, so a re-run skips finished cells and any
changed setting makes a new cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompare.sdk.registry import get_registry
from qcompare.sdk.memo import memo_dict

if TYPE_CHECKING:
    from qcompare.engine.recipe import PluginChoice, Recipe


@dataclass(frozen=True)
class Cell:
    """One point of the cross product. ``quantizer`` and ``distiller`` are None for the
    teacher baseline row; ``seed`` is None where no plugin's result depends on it."""

    model: str
    quantizer: PluginChoice | None
    distiller: PluginChoice | None
    seed: int | None
    shared: tuple  # (data, evaluators) as canonical JSON: they change results too

    @property
    def is_teacher(self) -> bool:
        return self.quantizer is None

    def settings(self) -> dict[str, Any]:
        data, evaluators = json.loads(self.shared[0]), json.loads(self.shared[1])
        return {
            "model": self.model,
            "quantizer": self.quantizer.settings() if self.quantizer else None,
            "distiller": self.distiller.settings() if self.distiller else None,
            "seed": self.seed,
            "data": None if self.is_teacher else data,
            "evaluators": evaluators,
        }

    @classmethod
    def from_settings(cls, settings) -> "Cell":
        """The cell a stored record's settings describe (``qcompare.results.record.CellSettings``)."""
        from qcompare.engine.recipe import PluginChoice

        s = settings.model_dump(mode="json")
        choice = lambda c: PluginChoice(**c) if c else None  # noqa: E731
        return cls(s["model"], choice(s["quantizer"]), choice(s["distiller"]), s["seed"],
                   (json.dumps(s["data"], sort_keys=True), json.dumps(s["evaluators"], sort_keys=True)))

    @cached_property  # frozen: hashed once, though plan, run and dedupe all ask
    def id(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def plugins(self) -> list[tuple[str, str]]:
        """(kind, name) of every plugin the cell's result depends on."""
        used = [("quantizer", self.quantizer.name), ("distiller", self.distiller.name)] if self.quantizer else []
        return used + [("evaluator", e["name"]) for e in json.loads(self.shared[1])]

    def label(self) -> str:
        if self.is_teacher:
            return f"{self.model} · teacher"
        seed = "" if self.seed is None else f" · seed {self.seed}"
        return f"{self.model} · {self.quantizer.label()} · {self.distiller.label()}{seed}"


def _seeded(kind: str, choice: PluginChoice | None) -> bool:
    return choice is not None and get_registry().get(kind, choice.name).seeded


_digests: dict[tuple, str] = memo_dict()  # a data file's digest by (path, size, mtime): read once per process


def data_identity(data) -> dict:
    """The training data as cell ids see it: a local file by its name and content, not its path,
    so a moved or re-cloned project finds its finished cells and an edited file makes new ones."""
    out = data.model_dump()
    path = Path(data.train) if data.train else None
    if path is not None and path.is_file():
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _digests:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            _digests[key] = digest.hexdigest()
        out.update(train=path.name, train_sha256=_digests[key])
    return out


def expand(recipe: Recipe) -> list[Cell]:
    """Every cell the recipe asks for, teacher baselines first, without duplicates."""
    shared = (
        json.dumps(data_identity(recipe.data), sort_keys=True),
        json.dumps([e.settings() for e in recipe.evaluators], sort_keys=True),
    )
    cells: list[Cell] = []
    if recipe.teacher:
        cells += [Cell(m, None, None, None, shared) for m in recipe.models]
    for model in recipe.models:
        for q in recipe.quantizers:
            for d in recipe.distillers:
                seeded = _seeded("quantizer", q) or _seeded("distiller", d)
                for seed in recipe.seeds if seeded else [None]:
                    cells.append(Cell(model, q, d, seed, shared))
    seen: set[str] = set()
    unique = []
    for c in cells:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique
