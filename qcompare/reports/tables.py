"""Comparison tables of a run folder: grouped rows, uncertainty, recovery, size, cost.

Rows are configurations (cells that differ only in seed are one row): the teacher, then
post-training quantization (cells with no seed: nothing trained), then distilled cells.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from qcompare.errors import QcompareError
from qcompare.results.frame import group_columns, is_accuracy, load_run, primary_metrics, setting_text
from qcompare.results.stats import interval_label, interval_text, mean_ci
from qcompare.results.store import RunStore

FORMATS = ("table", "markdown", "latex", "csv", "json")
MIN_GAP = 0.01  # the teacher − PTQ gap (on the average) below which "recovered" is not computed


def _describe(row: pd.Series, params: list[str]) -> str:
    if row["quantizer"] == "teacher":
        return "teacher"
    described = []
    for kind in ("quantizer", "distiller"):
        parts = [f"{c.split('.', 1)[1]}={setting_text(row[c])}" for c in params if c.startswith(f"{kind}.") and _present(row[c])]
        described.append(f"{row[kind]}({','.join(parts)})" if parts else row[kind])
    return " · ".join(described)


def _present(v) -> bool:
    return not (isinstance(v, float) and math.isnan(v)) and v is not None


def _value(v) -> str | None:
    """A parameter's value as text, None where the row's plugin has no such parameter (NaN in the frame)."""
    return setting_text(v) if _present(v) else None


def _varying(df: pd.DataFrame, cols: list[str]) -> list[str]:
    """Parameter columns whose value differs somewhere: the ones worth printing. A quantizer parameter
    that several quantizers share (bits, group size) differs too where one quantizer lacks it
    (``torchao(bits=4,...)`` beside ``nvfp4``); a parameter of one plugin alone (torchao's ``symmetric``,
    every setting of a distiller beside ``none``) shows only where its values differ."""
    rows = df[df["quantizer"] != "teacher"] if "quantizer" in df else df
    out = []
    for c in cols:
        if not c.startswith(("quantizer.", "distiller.")):
            continue
        kind = c.split(".", 1)[0]
        values = {_value(v) for v in rows[c]}
        shared = kind == "quantizer" and rows.loc[rows[c].map(_present), kind].nunique() > 1
        if len(values - {None}) > 1 or (shared and len(values) > 1):
            out.append(c)
    return out


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
    df = with_logical_time(df)
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
            row[m], row[f"{m} ±"], row[f"{m} over"] = mean_ci(g[m].tolist() if m in g else [], err)
        row.update(_size_and_cost(first, g))
        rows.append(row)
    out = pd.DataFrame(rows)
    # The same configuration run on other data or evaluations (an earlier version of the
    # recipe in the same folder) is a row of its own, told apart by its setup digest.
    twice = out.duplicated(["model", "config"], keep=False)
    other_setup = twice & out.duplicated(["model", "config", "setup"], keep=False).__invert__()
    out.loc[other_setup, "config"] = out.loc[other_setup, "config"] + " · setup " + out.loc[other_setup, "setup"]
    # the same configuration made by other plugin versions (stale cells kept with --keep-stale)
    twice = out.duplicated(["model", "config"], keep=False)
    out.loc[twice, "config"] = out.loc[twice, "config"] + " · plugins " + out.loc[twice, "versions"]
    out["_order"] = out["kind"].map({"teacher": 0, "ptq": 1, "distilled": 2})
    out = out.sort_values(["model", "_order", "config"], kind="stable").drop(columns="_order").reset_index(drop=True)
    if "average" in metrics:
        _add_recovery(out)
    return out, metrics


def with_logical_time(df: pd.DataFrame) -> pd.DataFrame:
    """Each cell's time as if nothing were cached: the teacher tokens a cache served, at the run's own
    measured seconds per teacher token (per model and device), added back as ``cost.teacher_seconds_saved``."""
    need = ("cost.teacher_cached_tokens", "cost.teacher_forward_seconds", "cost.teacher_tokens", "cost.device")
    if not all(c in df for c in need) or not df["cost.teacher_cached_tokens"].fillna(0).any():
        return df
    df = df.copy()
    df["cost.teacher_seconds_saved"] = 0.0
    for _, g in df.groupby(["model", "cost.device"], dropna=False):
        tokens = g["cost.teacher_tokens"].fillna(0).sum()
        if tokens:
            rate = g["cost.teacher_forward_seconds"].fillna(0).sum() / tokens
            df.loc[g.index, "cost.teacher_seconds_saved"] = g["cost.teacher_cached_tokens"].fillna(0) * rate
    return df


def _mean(g: pd.DataFrame, column: str) -> float:
    return float(g[column].mean()) if column in g and g[column].notna().any() else float("nan")


def _size_and_cost(first: pd.Series, g: pd.DataFrame) -> dict:
    """A configuration's size (as measured in its converted model) and logical cost (as if nothing
    were cached or shared: the same for a cell whichever ran first)."""
    get = lambda key: first.get(key) if key in first and pd.notna(first.get(key)) else float("nan")  # noqa: E731
    seconds = g["cost.total_seconds"] + g["cost.teacher_seconds_saved"].fillna(0) \
        if "cost.teacher_seconds_saved" in g else g.get("cost.total_seconds", pd.Series(dtype=float))
    cuda = g.get("cost.device", pd.Series(dtype=str)).eq("cuda")
    return {
        "quantized": get("quantized_share_body"),
        "bits/weight": get("bits_per_weight"),
        "model bits": get("model_bits_per_weight"),
        "nominal bits": get("nominal_bits"),
        "MB": get("packed_bytes") / 1e6,
        "TFLOP": _mean(g, "cost.flops") / 1e12,
        "time s": float(seconds.mean()) if len(seconds) else float("nan"),
        "GPU h": float(seconds[cuda].sum() / 3600) if cuda.any() else float("nan"),
        "tokens gen": _mean(g, "cost.tokens_generated"),
    }


def _add_recovery(out: pd.DataFrame) -> None:
    """Δ to the teacher, Δ to the same quantizer's post-training row (negative: training made it
    worse), and the share of the quantization gap recovered: (D − PTQ) / (T − PTQ), negative too."""
    qcols = [c for c in out.columns if c.startswith("quantizer.")]
    out["Δ teacher"] = np.nan
    out["Δ PTQ"] = np.nan
    out["recovered"] = np.nan
    for i, row in out.iterrows():
        teacher = out[(out["model"] == row["model"]) & (out["kind"] == "teacher")]
        if teacher.empty or row["kind"] == "teacher":
            continue
        t = teacher["average"].iloc[0]
        out.at[i, "Δ teacher"] = row["average"] - t
        # the same quantizer with the same parameters; a parameter it lacks is absent on both sides
        same_q = (out["model"] == row["model"]) & (out["kind"] == "ptq") & (out["quantizer"] == row["quantizer"])
        for c in qcols:
            same_q &= out[c].map(_value) == _value(row[c]) if _present(row[c]) else out[c].map(_value).isna()
        ptq = out[same_q]
        if row["kind"] != "distilled" or ptq.empty:
            continue
        p = ptq["average"].iloc[0]
        out.at[i, "Δ PTQ"] = row["average"] - p
        # A share of a gap smaller than MIN_GAP is noise divided by noise: left blank (Δ PTQ says it)
        if t - p >= MIN_GAP:
            out.at[i, "recovered"] = (row["average"] - p) / (t - p)


def _fmt(value, pct=False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if pct:
        return f"{value:.0%}"
    text = f"{value:.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
    return "0.000" if text == "-0.000" else text


def _amount(value, digits: int = 3) -> str:
    """A size or a cost: fixed decimals, or two significant digits where the decimals would read 0
    (a short cell's GPU hours, a tiny model's TFLOP)."""
    if value is not None and not math.isnan(value) and 0 < abs(value) < 10 ** -digits:
        return f"{value:.2g}"
    return _fmt(value, digits=digits)


def _count(value) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.0f}"


# The size-and-cost columns: name → how a summary row's value reads.
SIZE_AND_COST = {
    "quantized": lambda v: _fmt(v, pct=True),  # share of the body's weights on a low-bit grid
    "bits/weight": lambda v: _fmt(v, digits=2),  # true: codes + scales + zero points as stored
    "model bits": lambda v: _fmt(v, digits=2),  # every weight, float layers and adapters included
    "nominal bits": lambda v: _fmt(v, digits=2),  # what the format's name promises
    "MB": _amount,  # the model at its true size
    "TFLOP": lambda v: _amount(v, digits=4),  # logical: as if nothing were cached or shared
    "time s": _amount,
    "GPU h": _amount,
    "tokens gen": _count,
}


def _interval(row) -> str:
    """What the row's ± are over, and how many (the average's, else its tasks')."""
    kinds = [v for k, v in row.items() if isinstance(k, str) and k.endswith(" over") and isinstance(v, str)]
    over = row.get("average over") if isinstance(row.get("average over"), str) else (kinds[0] if kinds else None)
    return interval_label(over, row["seeds"])


def _cells(row, metrics, every_ci: bool = True) -> list[str]:
    """A summary row as text; ``every_ci=False`` keeps the ± for the average only (narrow tables)."""
    return [
        row["config"], str(row["seeds"]), _interval(row),
        *(interval_text(row[m], row[f"{m} ±"] if every_ci or m == "average" else None, row.get(f"{m} over"),
                        number=_fmt) for m in metrics),
        _fmt(row.get("Δ teacher")), _fmt(row.get("Δ PTQ")), _fmt(row.get("recovered"), pct=True),
        *(fmt(row.get(col, float("nan"))) for col, fmt in SIZE_AND_COST.items()),
    ]


HEAD = ["configuration", "seeds", "± over"]
TAIL = ["Δ teacher", "Δ PTQ", "recovered", *SIZE_AND_COST]


def print_report(store_or_path, console: Console, fmt: str = "table", metrics: list[str] | None = None) -> None:
    root = store_or_path.root if isinstance(store_or_path, RunStore) else Path(store_or_path)
    every = load_run(root, include_failed=True)
    df = every[every["status"] == "done"].reset_index(drop=True) if not every.empty else every
    notes = cell_notes(root)
    if df.empty and fmt == "table":
        console.print(f"no finished cells in {root}")
    summary, metrics = summarize(df, metrics)
    if fmt != "table":
        console.print(export(summary, metrics, fmt, notes, every), soft_wrap=True, highlight=False, markup=False)
        return
    if not df.empty:
        for title, cols, rows, kinds in report_tables(summary, metrics, root):
            console.print(_table(title, cols, rows, kinds))
        for line in footnotes(df, root):
            console.print(line, style="dim", highlight=False)
        for line in notes_lines(df):
            console.print(line, style="yellow", highlight=False)
    for head, some in note_groups(notes):
        console.print(head + ":", style="yellow" if some[0].kind == "model not saved" else "red", highlight=False)
        for note in some:
            console.print(f"  {note}", highlight=False)


@dataclass(frozen=True)
class CellNote:
    """A cell the tables leave out (it did not finish) or cannot fully vouch for (its model was not saved)."""

    id: str
    label: str
    kind: str  # "damaged", "not finished" or "model not saved"
    why: str  # the error line

    def __str__(self) -> str:
        return f"{self.id} {self.label}: {self.why}"


# What each kind of note means for the tables; every format heads its notes with these words.
NOTE_HEADS = {"damaged": "damaged cells (a file changed or unreadable since the run)",
              "not finished": "cells not finished, left out of the tables",
              "model not saved": "finished cells whose model was not saved (save_models = true); their rows stand"}
RERUN = {True: "running the recipe again retries it", False: "a re-run fails the same way"}


def cell_notes(root: Path) -> list[CellNote]:
    """The cells every report format names beside its tables: damaged ones (``results.damaged_cells``), those
    that did not finish (failed, interrupted or still running), then finished ones whose model was not saved."""
    from qcompare.results.frame import damaged_cells
    from qcompare.engine.runner import still_running

    records = list(RunStore(root).records())
    notes = [CellNote(cid, label, "damaged", why) for cid, label, why in damaged_cells(root)]
    for r in records:
        if r.done:
            continue
        why = r.error or ("still running" if still_running(r) else
                          "interrupted: its process is gone; running the recipe again resumes it")
        again = RERUN.get(r.rerun_helps)
        notes.append(CellNote(r.id, r.label, "not finished", why + (f" ({again})" if again else "")))
    unsaved = [r for r in records if r.done and r.save_error]
    return notes + [CellNote(r.id, r.label, "model not saved", r.save_error) for r in unsaved]


def note_groups(notes: list[CellNote]) -> list[tuple[str, list[CellNote]]]:
    """The notes under their heading ("2 cells not finished, left out of the tables"), in the order
    every format shows them."""
    groups = [(kind, [n for n in notes if n.kind == kind]) for kind in NOTE_HEADS]
    return [(f"{len(some)} {NOTE_HEADS[kind]}", some) for kind, some in groups if some]


def report_tables(summary: pd.DataFrame, metrics: list[str], root: Path):
    """(title, columns, rows, kinds) of each table the report shows: per model, accuracy, then
    size and cost (columns with nothing to say left out)."""
    for model, part in summary.groupby("model", sort=False):
        rows = [_cells(row, metrics, every_ci=False) for _, row in part.iterrows()]
        cols = HEAD + metrics + TAIL
        split = len(HEAD) + len(metrics) + 3  # accuracy table | size-and-cost table
        for title, idx in ((f"{model}: accuracy  ({root})", range(split)),
                           (f"{model}: size and cost", [0, *range(split, len(cols))])):
            keep = [i for i in idx if i < split or any(r[i] not in ("—", "0") for r in rows)]
            yield title, [cols[i] for i in keep], [[r[i] for i in keep] for r in rows], list(part["kind"])


def footnotes(df: pd.DataFrame, root: Path) -> list[str]:
    """What the tables' columns and intervals mean, and what the run saved and estimated."""
    lines = ["± is the half-width of a 95% CI, over what \"± over\" says: the seeds (Student's t), or, with one "
             "run, the items (1.96 × the evaluator's stderr; training variance unknown); \"=\" marks seeds that "
             "agreed exactly (every column's ± in --format csv/json/markdown). Δ PTQ = distilled − the same "
             "quantizer without training; recovered = Δ PTQ / (teacher − PTQ) on the average, where that gap is "
             f"at least {MIN_GAP} (negative: training made it worse). Compare two rows with --compare A B.", SIZE_NOTE]
    return lines + [line for line in (cache_saving(df), estimate_line(root)) if line]


SIZE_NOTE = ("quantized = share of the body's weights (all but embeddings and head) on a low-bit grid; bits/weight = "
             "true bits per quantized weight (codes at the format's width, scales and zero points as stored); model "
             "bits = over every weight of the model, float layers and LoRA adapters included; nominal = the format's "
             "name; MB = the model at its true size. TFLOP and time s are each cell's logical cost, as if nothing "
             "were cached or shared (a cached teacher batch counts as computed; its time is estimated from the "
             "run's own teacher forwards).")


def notes_lines(df: pd.DataFrame) -> list[str]:
    """What plugins recorded about how cells ran (``CellContext.notes``), once per configuration."""
    if "notes" not in df:
        return []
    out = []
    for (label, text), _ in df[df["notes"] != ""].groupby([df["label"].str.replace(r" · seed \d+$", "", regex=True),
                                                           "notes"], sort=False):
        for plugin, note in json.loads(text).items():
            # a line as the plugin wrote it (a string, or a dict's "summary": empty when it has nothing to say)
            said = note.get("summary", json.dumps(note)) if isinstance(note, dict) else str(note)
            if said:
                out.append(f"{label}: {plugin}: {said}")
    return out


def estimate_line(root: Path) -> str | None:
    """The price the run put on its cells before running them, against what they took."""
    from qcompare.engine.estimate import against_actual

    found = against_actual(RunStore(root).records())
    if not found:
        return None
    parts = [f"{what} {med:.2f}× (from {lo:.2f}× to {hi:.2f}×, {n} cells)" for what, v in
             (("time", found["seconds"]), ("FLOPs", found["flops"])) if v for med, lo, hi, n in [v]]
    return ("actual cost / the estimate made before each cell ran (qcompare plan's price), median: " + "; ".join(parts)
            + " — above 1: the estimate was low")


def cache_saving(df: pd.DataFrame) -> str | None:
    """What caches and sharing saved this run as a whole (the tables show logical cost)."""
    if "cost.teacher_cached_tokens" not in df or not df["cost.teacher_cached_tokens"].fillna(0).any():
        return None
    df = with_logical_time(df)
    cached = df["cost.teacher_cached_tokens"].fillna(0).sum()
    logical = df.get("cost.teacher_tokens_logical", df["cost.teacher_cached_tokens"]).fillna(0).sum()
    flops = (df.get("cost.flops", 0) - df.get("cost.flops_spent", 0)).fillna(0).sum() if "cost.flops_spent" in df else 0
    seconds = df.get("cost.teacher_seconds_saved", pd.Series(dtype=float)).fillna(0).sum()
    return (f"this run's teacher cache served {cached:,.0f} of {logical:,.0f} teacher tokens ({cached / logical:.0%}): "
            f"{flops / 1e12:.4f} TFLOP and about {seconds:.0f} s not spent, over the whole run")


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


def export(summary: pd.DataFrame, metrics: list[str], fmt: str, notes: list[CellNote] = (),
           cells: pd.DataFrame | None = None) -> str:
    """The summary as ``fmt``, with the ``notes`` (``cell_notes``) every format carries: after the table in
    markdown and LaTeX (as comments), as rows and columns in CSV and JSON (``export_rows``)."""
    if fmt not in FORMATS:
        raise QcompareError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    cols = HEAD + metrics + TAIL
    rows = [_cells(r, metrics) for _, r in summary.iterrows()]
    groups = note_groups(list(notes))
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c == "configuration" else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        for head, some in groups:
            lines += ["", f"**{head}:**", "", *(f"- `{n.id}` {n.label}: {n.why}" for n in some)]
        return "\n".join(lines)
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
        body = [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
        # comments: the facts travel with the source without breaking a table pasted into a float
        said = [line for head, some in groups for line in (f"% {head}:", *(f"%   {n}" for n in some))]
        return "\n".join([r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
                          " & ".join(esc(c) for c in cols) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]
                         + said)
    data = export_rows(summary, list(notes), cells)
    if fmt == "csv":
        # text fields quoted, so that a "#" in a label or an error survives read_csv(comment="#")
        return data.head(0).to_csv(index=False) + data.to_csv(index=False, header=False, quoting=csv.QUOTE_NONNUMERIC)
    return data.to_json(orient="records", indent=2, double_precision=15)


def export_rows(summary: pd.DataFrame, notes: list[CellNote], cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of --format csv and json: one per configuration, then one per cell that did not finish
    (kind "not finished", or "damaged" for a cell whose record is unreadable; its settings, no numbers,
    ``error`` saying why); every row has ``cells`` (its
    cell ids), ``model not saved`` (its cells whose model was not saved, and why) and ``error``."""
    # with nothing finished there is no summary: the rows of the cells that did not finish stand alone
    data = summary.drop(columns=["ids"]) if "ids" in summary else pd.DataFrame(columns=["model", "config", "kind",
                                                                                       "seeds"])
    ids = list(summary["ids"]) if "ids" in summary else []
    unsaved = {n.id: n.why for n in notes if n.kind == "model not saved"}
    data = data.assign(cells=[" ".join(i) for i in ids],
                       **{"model not saved": ["; ".join(f"{c}: {unsaved[c]}" for c in i if c in unsaved) or None
                                              for i in ids]}, error=None)
    settings = cells.set_index("id") if cells is not None and not cells.empty else pd.DataFrame()
    keys = [c for c in group_columns(settings) if c in data] if not settings.empty else []
    added = []
    listed = {c for i in ids for c in i}
    for n in (n for n in notes if n.kind == "not finished" or n.kind == "damaged" and n.id not in listed):
        cell = settings.loc[n.id] if n.id in settings.index else pd.Series(dtype=object)
        model = cell.get("model", "")
        added.append({**{k: cell[k] for k in keys if k in cell}, "config": n.label.removeprefix(f"{model} · "),
                      "kind": n.kind, "seeds": 0, "cells": n.id, "error": n.why})
    if not added:
        return data
    return pd.DataFrame(data.to_dict("records") + added, columns=data.columns)
