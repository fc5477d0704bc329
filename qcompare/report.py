"""Comparison tables of a run folder: grouped rows, uncertainty, recovery, size, cost.

Rows are configurations (cells that differ only in seed are one row): the teacher, then
post-training quantization (cells with no seed: nothing trained), then distilled cells.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from qcompare.errors import QcompareError
from qcompare.results import (group_columns, is_accuracy, leaf_tasks, load_run, metric_column, primary_metrics,
                               setting_column)
from qcompare.stats import Comparison, mean_ci, paired_bootstrap
from qcompare.store import open_run

FORMATS = ("table", "markdown", "latex", "csv", "json")
MIN_GAP = 0.01  # the teacher − PTQ gap (on the average) below which "recovered" is not computed


def _value(v) -> str:
    # pandas stores an int column with gaps (the teacher row) as float: show 4, not 4.0
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _describe(row: pd.Series, params: list[str]) -> str:
    if row["quantizer"] == "teacher":
        return "teacher"
    described = []
    for kind in ("quantizer", "distiller"):
        parts = [f"{c.split('.', 1)[1]}={_value(row[c])}" for c in params if c.startswith(f"{kind}.") and _present(row[c])]
        described.append(f"{row[kind]}({','.join(parts)})" if parts else row[kind])
    return " · ".join(described)


def _present(v) -> bool:
    return not (isinstance(v, float) and math.isnan(v)) and v is not None


def _varying(df: pd.DataFrame, cols: list[str]) -> list[str]:
    """Parameter columns whose value differs somewhere: the ones worth printing."""
    return [c for c in cols if c.startswith(("quantizer.", "distiller.")) and df[c].astype(str).nunique() > 1]


def summarize(df: pd.DataFrame, metrics: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per configuration: mean ± 95% CI per metric, Δ to teacher, share recovered, size, cost."""
    if df.empty:
        return df, []
    if not metrics:
        # The benchmarks' main accuracies, then proxies such as perplexity and KL.
        metrics = primary_metrics(df.columns, df.attrs.get("groups")) + sorted(
            c for c in df.columns if "/" in c and ":" not in c and not is_accuracy(c.partition("/")[2]))
    if "average" in df.columns:
        metrics = metrics + ["average"]
    keys = group_columns(df)
    shown = _varying(df, keys)
    rows = []
    for _, g in df.groupby(keys, dropna=False, sort=False):
        first = g.iloc[0]
        row = {k: first[k] for k in keys}
        row["config"] = _describe(first, shown)
        row["kind"] = "teacher" if first["quantizer"] == "teacher" else ("ptq" if pd.isna(first["seed"]) else "distilled")
        row["seeds"] = int(g["seed"].nunique()) or 1
        row["ids"] = list(g["id"])
        for m in metrics:
            err = g[f"{m}:stderr"].iloc[0] if f"{m}:stderr" in g and len(g) == 1 else None
            row[m], row[f"{m} ±"] = mean_ci(g[m].tolist() if m in g else [], err)
        row["bits per weight"] = first.get("bits_per_weight")
        row["MB"] = first.get("storage_bytes", float("nan")) / 1e6
        row["time s"] = g["cost.total_seconds"].mean() if "cost.total_seconds" in g else float("nan")
        cuda = g.get("cost.device", pd.Series(dtype=str)).eq("cuda")
        row["GPU h"] = float((g["cost.total_seconds"][cuda]).sum() / 3600) if cuda.any() else float("nan")
        row["tokens gen"] = g["cost.tokens_generated"].mean() if "cost.tokens_generated" in g else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    # The same configuration run on other data or evaluations (an earlier version of the
    # recipe in the same folder) is a row of its own, told apart by its setup digest.
    twice = out.duplicated(["model", "config"], keep=False)
    out.loc[twice, "config"] = out.loc[twice, "config"] + " · setup " + out.loc[twice, "setup"]
    out["_order"] = out["kind"].map({"teacher": 0, "ptq": 1, "distilled": 2})
    out = out.sort_values(["model", "_order", "config"], kind="stable").drop(columns="_order").reset_index(drop=True)
    if "average" in metrics:
        _add_recovery(out)
    return out, metrics


def _add_recovery(out: pd.DataFrame) -> None:
    """Δ to the teacher and the share of the quantization gap recovered: (D − PTQ) / (T − PTQ)."""
    qcols = [c for c in out.columns if c.startswith("quantizer.")]
    out["Δ teacher"] = np.nan
    out["recovered"] = np.nan
    for i, row in out.iterrows():
        teacher = out[(out["model"] == row["model"]) & (out["kind"] == "teacher")]
        if teacher.empty or row["kind"] == "teacher":
            continue
        t = teacher["average"].iloc[0]
        out.at[i, "Δ teacher"] = row["average"] - t
        same_q = (out["model"] == row["model"]) & (out["kind"] == "ptq") & (out["quantizer"] == row["quantizer"])
        for c in qcols:
            same_q &= out[c].astype(str) == str(row[c])
        ptq = out[same_q]
        # A share of a gap smaller than MIN_GAP is noise divided by noise: left blank.
        if row["kind"] == "distilled" and not ptq.empty and t - ptq["average"].iloc[0] >= MIN_GAP:
            p = ptq["average"].iloc[0]
            out.at[i, "recovered"] = (row["average"] - p) / (t - p)


def _fmt(value, half=None, pct=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if pct:
        return f"{value:.0%}"
    text = f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    text = "0.000" if text == "-0.000" else text
    return f"{text}±{half:.3f}" if half is not None and not math.isnan(half) else text


def _cells(row, metrics, every_ci: bool = True) -> list[str]:
    """A summary row as text; ``every_ci=False`` keeps the ± for the average only (narrow tables)."""
    return [
        row["config"], str(row["seeds"]),
        *(_fmt(row[m], row[f"{m} ±"] if every_ci or m == "average" else None) for m in metrics),
        _fmt(row.get("Δ teacher")), _fmt(row.get("recovered"), pct=True),
        _fmt(row["bits per weight"]), _fmt(row["MB"]), _fmt(row["time s"]), _fmt(row["GPU h"]),
        "—" if math.isnan(row["tokens gen"]) else f"{row['tokens gen']:,.0f}",
    ]


HEAD = ["configuration", "seeds"]
TAIL = ["Δ teacher", "recovered", "bits per weight", "MB", "time s", "GPU h", "tokens gen"]


def print_report(store_or_path, console: Console, fmt: str = "table", metrics: list[str] | None = None) -> None:
    root = getattr(store_or_path, "root", store_or_path)
    every = load_run(root, include_failed=True)
    failed = every[every["status"] != "done"] if not every.empty else every
    df = every[every["status"] == "done"].reset_index(drop=True) if not every.empty else every
    if df.empty:
        console.print(f"no finished cells in {root}")
        return
    summary, metrics = summarize(df, metrics)
    if fmt != "table":
        console.print(export(summary, metrics, fmt), soft_wrap=True, highlight=False, markup=False)
        return
    for model, part in summary.groupby("model", sort=False):
        rows = [_cells(row, metrics, every_ci=False) for _, row in part.iterrows()]
        cols = HEAD + metrics + TAIL
        split = len(HEAD) + len(metrics) + 2  # accuracy table | size-and-cost table
        for title, idx in ((f"{model}: accuracy  ({root})", range(split)),
                           (f"{model}: size and cost", [0, *range(split, len(cols))])):
            keep = [i for i in idx if i < split or any(r[i] not in ("—", "0") for r in rows)]
            console.print(_table(title, [cols[i] for i in keep], [[r[i] for i in keep] for r in rows], list(part["kind"])))
    console.print("± is the half-width of a 95% CI: over seeds (t), or 1.96 × the evaluator's stderr with one seed "
                  "(every column's in --format csv/json/markdown). recovered = (distilled − PTQ) / (teacher − PTQ) "
                  f"on the average, where that gap is at least {MIN_GAP}.", style="dim")
    if not failed.empty:
        console.print(f"[red]{len(failed)} cells not finished[/] (failed, or interrupted: run the recipe again): "
                      + "; ".join(f"{r.id} ({r.error if isinstance(r.error, str) else r.status})" for r in failed.itertuples()))


def _header(name: str) -> str:
    """Break a long column name at / - _ so narrow columns keep whole values."""
    parts = []
    for word in name.split("/"):
        parts.append(re.sub(r"([-_])", "\\1\n", word) if len(word) > 10 else word)
    return "/\n".join(parts)


def _table(title: str, cols: list[str], rows: list[list[str]], kinds: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(cols):
        # a task's main accuracy is headed by the task alone; headers wrap, values never do
        head = col.removesuffix("/" + col.partition("/")[2]) if is_accuracy(col.partition("/")[2]) else col
        table.add_column(_header(head), min_width=max(len(r[i]) for r in rows), justify="left" if i == 0 else "right")
    last = None
    for row, kind in zip(rows, kinds):
        if last is not None and kind != last:
            table.add_section()
        last = kind
        table.add_row(*row, style="bold" if kind == "teacher" else None)
    return table


def export(summary: pd.DataFrame, metrics: list[str], fmt: str) -> str:
    if fmt not in FORMATS:
        raise QcompareError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    cols = HEAD + metrics + TAIL
    rows = [_cells(r, metrics) for _, r in summary.iterrows()]
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c == "configuration" else "---:" for c in cols) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
        body = [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
        return "\n".join([r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
                          " & ".join(esc(c) for c in cols) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"])
    data = summary.drop(columns=["ids"]).copy()
    if fmt == "csv":
        return data.to_csv(index=False)
    return data.to_json(orient="records", indent=2, double_precision=15)


# --- paired comparison -------------------------------------------------------------------


def select(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    """Cells chosen by an id prefix or by ``key=value[,key=value]`` over the settings columns.

    A key may be a full column (``distiller.lmbda``) or a parameter name (``lmbda``).
    """
    if "=" not in spec:
        hit = df[df["id"].str.startswith(spec)]
        if hit.empty:
            raise QcompareError(f"--compare: no finished cell id starts with {spec!r}")
        return hit
    mask = pd.Series(True, index=df.index)
    for part in spec.split(","):
        key, _, value = part.partition("=")
        column = setting_column(df, key.strip(), "--compare setting")
        mask &= df[column].map(lambda v, want=value.strip(): _same(v, want))
    hit = df[mask]
    if hit.empty:
        raise QcompareError(f"--compare: no finished cell matches {spec!r}")
    return hit


def _same(stored, wanted: str) -> bool:
    """Whether a stored setting equals a value typed on the command line (8 matches 8.0)."""
    if str(stored) == wanted or _value(stored) == wanted:
        return True
    try:
        return float(stored) == float(wanted)
    except (TypeError, ValueError):
        return False


def _items(root: Path, ids: list[str], tasks: list[str], groups: dict) -> dict[str, np.ndarray]:
    """Per-item scores of a set of cells, averaged over the cells (seeds) item by item.

    A group's items are its subtasks' items, pooled in a fixed order.
    """
    store = open_run(root)
    per_task: dict[str, list] = {}
    for cid in ids:
        items = store.cell(cid).read_items()
        if items is None:
            continue
        for task in tasks:
            leaves = leaf_tasks(task, groups)
            if all(leaf in items for leaf in leaves):
                per_task.setdefault(task, []).append([x for leaf in leaves for x in items[leaf]])
    return {t: np.mean(np.asarray(v, dtype=float), axis=0) for t, v in per_task.items() if len({len(x) for x in v}) == 1}


def compare(root: Path, a: str, b: str) -> tuple[Comparison, pd.DataFrame, pd.DataFrame]:
    df = load_run(root)
    if df.empty:
        raise QcompareError(f"no finished cells in {root}")
    cells_a, cells_b = select(df, a), select(df, b)
    groups = df.attrs.get("groups", {})
    tasks = [m.split("/")[0] for m in primary_metrics(df.columns, groups)]
    try:
        result = paired_bootstrap(_items(root, list(cells_a["id"]), tasks, groups),
                                  _items(root, list(cells_b["id"]), tasks, groups))
    except ValueError as e:
        raise QcompareError(f"--compare: {e}") from None
    return result, cells_a, cells_b


def print_comparison(root: Path, a: str, b: str, console: Console) -> None:
    result, cells_a, cells_b = compare(root, a, b)
    console.print(f"A = {a}: {len(cells_a)} cells ({', '.join(cells_a['label'])})", highlight=False)
    console.print(f"B = {b}: {len(cells_b)} cells ({', '.join(cells_b['label'])})", highlight=False)
    console.print(f"A − B on the {len(result.tasks)}-task average ({result.items} paired items): "
                  f"{result.difference:+.4f}, 95% CI [{result.low:+.4f}, {result.high:+.4f}] "
                  f"(paired bootstrap over items) → [bold]{result.verdict}[/]", highlight=False)


# --- pivots ------------------------------------------------------------------------------


def pivot(root: Path, rows: str, cols: str, metric: str) -> pd.DataFrame:
    """Mean ± CI of ``metric`` for each (rows, cols) pair of settings, over seeds."""
    df = load_run(root)
    if df.empty:
        raise QcompareError(f"no finished cells in {root}")
    r, c = setting_column(df, rows, "axis"), setting_column(df, cols, "axis")
    metric_column(df, metric)
    table = {}
    for (rv, cv), g in df[df["quantizer"] != "teacher"].groupby([r, c]):
        m, half = mean_ci(g[metric].tolist())
        table.setdefault(_value(rv), {})[_value(cv)] = _fmt(m, half)
    return pd.DataFrame(table).T.sort_index().rename_axis(f"{rows} \\ {cols}")


def print_pivot(root: Path, rows: str, cols: str, metric: str, console: Console) -> None:
    frame = pivot(root, rows, cols, metric)
    table = Table(title=f"{metric}: {rows} × {cols}", title_justify="left")
    table.add_column(frame.index.name)
    for col in frame.columns:
        table.add_column(str(col), justify="right")
    for idx, row in frame.iterrows():
        table.add_row(str(idx), *(row.fillna("—").astype(str)))
    console.print(table)
