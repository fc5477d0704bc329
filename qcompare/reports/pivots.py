"""``qcompare report --rows X --cols Y``: a metric over two settings, each cell one configuration's
seeds — never other settings pooled as if they were seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from qcompare.errors import QcompareError
from qcompare.results.frame import LOWER_IS_BETTER, group_columns, load_run, metric_column, setting_column, setting_text
from qcompare.results.stats import interval_text, mean_ci

FOLDS = ("best", "mean")


def lower_is_better(metric: str) -> bool:
    return metric.rpartition("/")[2] in LOWER_IS_BETTER


def best_configuration(g: pd.DataFrame, keys: list[str], by: str) -> tuple[pd.DataFrame, int]:
    """The configuration (cells that differ only in seed) with the best mean of ``by``, and how many
    configurations there were."""
    groups = [h for _, h in g.groupby(keys, dropna=False, sort=False)]
    means = [h[by].mean() for h in groups]
    pick = min if lower_is_better(by) else max
    return groups[means.index(pick(means))], len(groups)


def pivot(root: Path, rows: str, cols: str, metric: str, fold: str = "best",
          select_on: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Mean ± CI over seeds of ``metric`` for each (rows, cols) pair of settings. Where several
    configurations land in one cell (other settings swept), ``fold`` says what it shows: the
    ``best`` configuration (chosen on ``select_on`` when given, else on ``metric`` itself, which
    is optimistic) or the ``mean`` of their means; the notes name what was folded."""
    if fold not in FOLDS:
        raise QcompareError(f"unknown --fold {fold!r}; allowed: {', '.join(FOLDS)}")
    df = load_run(root)
    if df.empty:
        raise QcompareError(f"no finished cells in {root}")
    r, c = setting_column(df, rows, "axis"), setting_column(df, cols, "axis")
    metric_column(df, metric)
    if select_on:
        metric_column(df, select_on, "selection metric")
    df = df[df["quantizer"] != "teacher"]
    keys = [k for k in group_columns(df) if k not in (r, c)]
    # what differs within the cells (plugin versions and set-ups follow the settings; named only alone)
    folded = {k: sorted({setting_text(v) for v in df[k] if v == v}) for k in keys if df[k].astype(str).nunique() > 1}
    if any(k not in ("versions", "setup") for k in folded):
        folded = {k: v for k, v in folded.items() if k not in ("versions", "setup")}
    table, several = {}, 0
    for (rv, cv), g in df.groupby([r, c]):
        if g[keys].astype(str).drop_duplicates().shape[0] > 1:
            several += 1
            if fold == "best":
                g, _ = best_configuration(g, keys, select_on or metric)
                cell = interval_text(*mean_ci(g[metric].tolist()))
            else:
                means = [h[metric].mean() for _, h in g.groupby(keys, dropna=False)]
                cell = f"{sum(means) / len(means):.3f} (mean of {len(means)})"
        else:
            cell = interval_text(*mean_ci(g[metric].tolist()))
        table.setdefault(setting_text(rv), {})[setting_text(cv)] = cell
    frame = pd.DataFrame(table).T.sort_index().rename_axis(f"{rows} \\ {cols}")
    notes = []
    if several:
        what = "; ".join(f"{k} ({', '.join(v)})" for k, v in folded.items())
        if fold == "best":
            on = (f"chosen on {select_on}, apart from the reported metric" if select_on and select_on != metric
                  else f"chosen on {metric} itself: optimistic, as the best of several on the reported metric is")
            notes.append(f"{several} cells hold several configurations that differ in {what}: each shows the best one "
                         f"({on}); --fold mean shows their mean")
        else:
            notes.append(f"{several} cells hold several configurations that differ in {what}: each shows the mean of "
                         "their means (no interval)")
    notes.append("each cell: mean ± 95% CI over one configuration's seeds (Student's t); \"=\": the seeds agreed exactly")
    return frame, notes


def print_pivot(root: Path, rows: str, cols: str, metric: str, console: Console, fold: str = "best",
                select_on: str | None = None) -> None:
    frame, notes = pivot(root, rows, cols, metric, fold, select_on)
    table = Table(title=f"{metric}: {rows} × {cols}", title_justify="left")
    table.add_column(frame.index.name)
    for col in frame.columns:
        table.add_column(str(col), justify="right")
    for idx, row in frame.iterrows():
        table.add_row(str(idx), *(row.fillna("—").astype(str)))
    console.print(table)
    for note in notes:
        console.print(note, style="dim", highlight=False)
