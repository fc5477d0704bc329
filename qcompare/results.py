"""A run folder as a pandas DataFrame: one row per cell, a column per setting, metric and cost.

This is the notebook API, and the report reads runs through it too::

    from qcompare.results import load_run
    df = load_run("runs/toy_int4")
    df.groupby("distiller.lmbda")["average"].mean()
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qcompare.store import open_run

# Metrics that are accuracies of a benchmark (higher is better, averaged into "average").
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "mc2", "f1")
# Settings columns; plugin parameters follow as "quantizer.<param>" / "distiller.<param>".
SETTINGS = ("model", "quantizer", "distiller", "seed")


def primary_metrics(columns, groups: dict[str, list[str]] | None = None) -> list[str]:
    """One accuracy column per top-level task: the first of ACCURACY_METRICS it reports.

    A group (lm-eval's ``mmlu``, the toy ``toy``) counts as one task through its aggregate;
    its subtasks are left out, as a five-task average counts MMLU once.
    """
    subtasks = {t for subs in (groups or {}).values() for t in subs}
    by_task: dict[str, list[str]] = {}
    for col in columns:
        task, _, metric = col.partition("/")
        if metric in ACCURACY_METRICS and task not in subtasks:
            by_task.setdefault(task, []).append(metric)
    return [f"{t}/{min(ms, key=ACCURACY_METRICS.index)}" for t, ms in sorted(by_task.items())]


def record_row(record: dict) -> dict:
    s = record["settings"]
    row = {"id": record["id"], "status": record["status"], "label": record.get("label", ""), "model": s["model"],
           "quantizer": s["quantizer"]["name"] if s["quantizer"] else "teacher",
           "distiller": s["distiller"]["name"] if s["distiller"] else "",
           "seed": s["seed"], "error": record.get("error")}
    for kind in ("quantizer", "distiller"):
        for k, v in ((s[kind] or {}).get("params") or {}).items():
            row[f"{kind}.{k}"] = tuple(v) if isinstance(v, list) else v
    row.update(record.get("metrics", {}))
    row.update({f"{k}:stderr": v for k, v in record.get("stderr", {}).items()})
    row.update(record.get("size", {}))
    row.update({f"cost.{k}": v for k, v in record.get("cost", {}).items() if not isinstance(v, (dict, list))})
    return row


def load_run(path: str | Path, include_failed: bool = False) -> pd.DataFrame:
    """Every stored cell of a run folder; ``average`` is the mean of the per-task accuracies."""
    records = list(open_run(path).records())
    df = pd.DataFrame([record_row(r) for r in records])
    if df.empty:
        return df
    if not include_failed:
        df = df[df["status"] == "done"].reset_index(drop=True)
    acc = primary_metrics(df.columns, group_tasks(records))
    if acc:
        df["average"] = df[acc].mean(axis=1)
    df.attrs["groups"] = group_tasks(records)
    return df


def group_tasks(records) -> dict[str, list[str]]:
    """Every group task of a run with its subtasks."""
    return {g: subs for r in records for g, subs in r.get("groups", {}).items()}


def leaf_tasks(task: str, groups: dict[str, list[str]]) -> list[str]:
    """The tasks with per-item scores under ``task`` (itself, if it is no group)."""
    if task not in groups:
        return [task]
    return [leaf for sub in groups[task] for leaf in leaf_tasks(sub, groups)]


def group_columns(df: pd.DataFrame) -> list[str]:
    """The settings that tell cells apart, except the seed: one group per configuration."""
    return [c for c in df.columns if c in SETTINGS[:3] or c.startswith(("quantizer.", "distiller."))]
