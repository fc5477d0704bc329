"""A run folder as a pandas DataFrame: one row per cell, a column per setting, metric and cost.

This is the notebook API, and the report reads runs through it too::

    from qcompare.results.frame import load_run
    df = load_run("runs/toy_int4")
    df.groupby("distiller.lmbda")["average"].mean()
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from qcompare.errors import QcompareError
from qcompare.results.record import CellRecord
from qcompare.results.store import open_run

# Metrics that are accuracies of a benchmark (higher is better, averaged into "average").
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "mc2", "f1")
# The part of a metric name after "/" for which lower is better (everything else: higher).
LOWER_IS_BETTER = ("kl", "ppl", "nll", "loss", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
# Settings columns; plugin parameters follow as "quantizer.<param>" / "distiller.<param>".
SETTINGS = ("model", "quantizer", "distiller", "seed")


def primary_metrics(columns, groups: dict[str, list[str]] | None = None) -> list[str]:
    """One accuracy column per top-level task: the first of ACCURACY_METRICS it reports.

    A group (lm-eval's ``mmlu``, the toy ``toy``) counts as one task through its aggregate;
    its subtasks are left out, as a five-task average counts MMLU once. A task scored under
    several filters (gsm8k's ``exact_match,strict-match`` / ``,flexible-extract``) counts once,
    by its strict match.
    """
    subtasks = {t for subs in (groups or {}).values() for t in subs}
    by_task: dict[str, list[str]] = {}
    for col in columns:
        task, _, metric = col.partition("/")
        if is_accuracy(metric) and ":" not in metric and task not in subtasks:
            by_task.setdefault(task, []).append(metric)

    def preference(metric: str):
        base, _, filter_name = metric.partition(",")
        return ACCURACY_METRICS.index(base), filter_name not in ("", "strict-match"), filter_name

    return [f"{t}/{min(ms, key=preference)}" for t, ms in sorted(by_task.items())]


def is_accuracy(metric: str) -> bool:
    """Whether a metric name (``acc``, ``exact_match,strict-match``) is a benchmark accuracy."""
    return metric.partition(",")[0] in ACCURACY_METRICS


def setting_text(v) -> str:
    """A setting as the recipe wrote it: pandas stores an int column with gaps (the teacher row) as
    float, so 4.0 shows as 4."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def record_row(record: CellRecord) -> dict:
    s = record.settings
    # Cells of one configuration pool as seeds only if they saw the same data and evaluations.
    setup = hashlib.sha256(json.dumps([s.data, s.evaluators], sort_keys=True).encode()).hexdigest()[:6]
    # ... and only if the same plugin versions made them (a stale cell is a row of its own)
    versions = hashlib.sha256(json.dumps(record.plugins, sort_keys=True).encode()).hexdigest()[:6] \
        if record.plugins else "unversioned"
    row = {"id": record.id, "status": record.status, "label": record.label, "model": s.model,
           "setup": setup, "versions": versions,
           "quantizer": s.quantizer.name if s.quantizer else "teacher",
           "distiller": s.distiller.name if s.distiller else "",
           "seed": s.seed, "error": record.error}
    for kind in ("quantizer", "distiller"):
        choice = getattr(s, kind)
        for k, v in (choice.params if choice else {}).items():
            row[f"{kind}.{k}"] = tuple(v) if isinstance(v, list) else v
    row["notes"] = json.dumps(record.notes, sort_keys=True) if record.notes else ""
    row.update(record.metrics)
    row.update({f"{k}:stderr": v for k, v in record.stderr.items()})
    row.update(record.size)
    row.update({f"cost.{k}": v for k, v in record.cost.items() if not isinstance(v, (dict, list))})
    return row


def load_run(path: str | Path, include_failed: bool = False) -> pd.DataFrame:
    """Every stored cell of a run folder; ``average`` is the mean of the per-task accuracies."""
    records = list(open_run(path).records())
    df = pd.DataFrame([record_row(r) for r in records])
    if df.empty:
        return df
    if not include_failed:
        df = df[df["status"] == "done"].reset_index(drop=True)
    groups = group_tasks(records)
    acc = primary_metrics(df.columns, groups)
    if acc:
        df["average"] = df[acc].mean(axis=1)
    df.attrs["groups"] = groups
    df.attrs["group_weighting"] = {g: w for r in records for g, w in r.group_weighting.items()}
    return df


def group_tasks(records) -> dict[str, list[str]]:
    """Every group task of a run with its subtasks."""
    return {g: subs for r in records for g, subs in r.groups.items()}


def leaf_tasks(task: str, groups: dict[str, list[str]]) -> list[str]:
    """The tasks with per-item scores under ``task`` (itself, if it is no group)."""
    if task not in groups:
        return [task]
    return [leaf for sub in groups[task] for leaf in leaf_tasks(sub, groups)]


def setting_column(df: pd.DataFrame, name: str, what: str = "setting") -> str:
    """The settings column a user names, in full (``distiller.lmbda``) or by parameter (``lmbda``)."""
    hits = [c for c in (*group_columns(df), "seed") if c == name or c.endswith(f".{name}")]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise QcompareError(f"unknown {what} {name!r}; known: {', '.join(group_columns(df) + ['seed'])}")
    raise QcompareError(f"{what} {name!r} is ambiguous: {' or '.join(hits)}; give the full name")


def metric_column(df: pd.DataFrame, name: str, what: str = "metric") -> str:
    """A metric the run reports (``task/metric``, or ``average``), checked by name."""
    known = sorted(c for c in df.columns if "/" in c and ":" not in c) + (["average"] if "average" in df else [])
    if name not in known:
        raise QcompareError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return name


def group_columns(df: pd.DataFrame) -> list[str]:
    """The settings that tell cells apart, except the seed: one group per configuration."""
    return [c for c in df.columns if c in (*SETTINGS[:3], "setup", "versions") or c.startswith(("quantizer.", "distiller."))]


def damage_notes(path: str | Path) -> list[str]:
    """One line per damaged cell of a run folder (``damaged_cells``)."""
    return [f"damaged cell {cid} ({label}): {why}" for cid, label, why in damaged_cells(path)]


def damaged_cells(path: str | Path) -> list[tuple[str, str, str]]:
    """(id, label, why) of each damaged cell of a run folder: what is wrong, what the tables lack because of
    it (a cell whose record is unreadable or gone is left out; one whose files changed keeps its row) and the
    cure."""
    store = open_run(path)
    lines = []
    for state in store.damaged():
        what = "; ".join(state.problems)
        if state.record is not None:
            effect = ("its row stands (result.json is intact), but "
                      + ("`--compare` cannot pair its items" if "items.json" in state.damage
                         else "its saved files are not what the run wrote (export refuses them)"))
        else:
            settings = store.cell(state.id).settings
            try:
                s = json.loads(settings.read_text())
            except (OSError, ValueError):
                s = {}
            if s and not s.get("quantizer"):
                effect = "left out: the teacher row is missing, and with it Δ teacher and recovered of every row"
            elif s and s.get("seed") is None:
                effect = ("left out: the untrained row of its quantizer is missing, and with it Δ PTQ and recovered "
                          "of that quantizer's rows")
            else:
                effect = "left out: its configuration's row has one seed fewer (or is missing)"
        lines.append((state.id, state.label, f"{what} — {effect}; `qcompare run` recomputes it and keeps the "
                      "damaged files aside"))
    return lines
