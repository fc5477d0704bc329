"""``qcompare report --compare A B``: which cells each side is, their items paired by id, the
table's own statistic, and a verdict (qcompare.reports.verdicts) a null result can rest on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qcompare.errors import QcompareError
from qcompare.results.frame import (LOWER_IS_BETTER, group_columns, leaf_tasks, load_run, metric_column, primary_metrics,
                              setting_column, setting_text)
from qcompare.results.store import open_run
from qcompare.reports.verdicts import Comparison, Side, Structure, compare as bootstrap


def _same(stored, wanted: str) -> bool:
    """Whether a stored setting equals a value typed on the command line (8 matches 8.0)."""
    if str(stored) == wanted or setting_text(stored) == wanted:
        return True
    try:
        return float(stored) == float(wanted)
    except (TypeError, ValueError):
        return False


def select(df: pd.DataFrame, spec: str, pool: bool = False, what: str = "--compare") -> pd.DataFrame:
    """Cells chosen by an id prefix or by ``key=value[,key=value]`` over the settings columns
    (a key is a full column, ``distiller.lmbda``, or a parameter name, ``lmbda``).

    The cells must be the seeds of one configuration: a selector that also matches cells differing
    in another setting is an error naming those settings, unless ``pool`` (then every matched
    cell counts as a run of one pooled configuration, and the output says so)."""
    if "=" not in spec:
        hit = df[df["id"].str.startswith(spec)]
        if hit.empty:
            raise QcompareError(f"{what}: no finished cell id starts with {spec!r}")
    else:
        mask = pd.Series(True, index=df.index)
        for part in spec.split(","):
            key, _, value = part.partition("=")
            column = setting_column(df, key.strip(), f"{what} setting")
            mask &= df[column].map(lambda v, want=value.strip(): _same(v, want))
        hit = df[mask]
        if hit.empty:
            raise QcompareError(f"{what}: no finished cell matches {spec!r}")
    differing = {c: sorted({setting_text(v) for v in hit[c]}) for c in group_columns(hit)
                 if hit[c].astype(str).nunique() > 1}
    if differing and not pool:
        listed = "; ".join(f"{c} ({', '.join(vs)})" for c, vs in differing.items())
        raise QcompareError(f"{what} {spec!r} matches cells of {len(hit.groupby(list(differing), dropna=False))} "
                            f"configurations that differ in {listed}; name them in the selector (e.g. "
                            f"{spec},{next(iter(differing)).split('.')[-1]}=…) or pass --pool to treat them as one")
    return hit


@dataclass
class Plan:
    """How the table's statistic is built from per-item scores."""

    structure: Structure
    metric: dict[str, str]  # leaf task -> the metric name its items carry for this statistic
    label: str


def plan_statistic(df: pd.DataFrame, metric: str) -> Plan:
    """The average (primary accuracy of each top-level task; a group counted once, its subtasks
    weighted as lm-eval weights them) or one ``task/metric``."""
    groups = df.attrs.get("groups", {})
    weighting = df.attrs.get("group_weighting", {})
    if metric == "average":
        entries = primary_metrics(df.columns, groups)
        if not entries:
            raise QcompareError("--compare: the run reports no benchmark accuracy to average; give --metric task/metric")
    else:
        entries = [metric_column(df, metric, "--compare metric")]
    top, leaf_metric, described = [], {}, []
    for entry in entries:
        task, _, name = entry.partition("/")
        top.append(task)
        leaves = leaf_tasks(task, groups)
        for leaf in leaves:
            leaf_metric[leaf] = name
        if len(leaves) > 1:
            described.append(f"{entry} (its {len(leaves)} subtasks, {weighting.get(task, 'size')}-weighted as lm-eval)")
        else:
            described.append(entry)
    structure = Structure(top, {t: leaf_tasks(t, groups) for t in top if t in groups},
                          {t: weighting.get(t, "size") for t in top if t in groups},
                          lower_is_better=metric != "average" and metric.rpartition("/")[2] in LOWER_IS_BETTER)
    label = f"the average of {', '.join(described)}" if metric == "average" else metric
    return Plan(structure, leaf_metric, label)


def sides(root: Path, cells_a: pd.DataFrame, cells_b: pd.DataFrame, plan: Plan) -> tuple[Side, Side, list[str]]:
    """Both sides' per-item scores, items paired by id across every cell of both sides."""
    store = open_run(root)
    notes = []
    loaded = {}
    for cid in list(cells_a["id"]) + list(cells_b["id"]):
        items = store.cell(cid).read_items()
        missing = [t for t in plan.metric if items is None or t not in items]
        if missing:
            raise QcompareError(f"--compare: cell {cid} has no per-item scores for {', '.join(missing)} (its evaluator "
                                "keeps none, or it was run with other tasks); compare cells evaluated on the same tasks")
        loaded[cid] = items
    positional = set()
    common = {}
    for task, name in plan.metric.items():
        per_cell = {}
        for cid, items in loaded.items():
            it = items[task]
            key = name if name in it.metrics else ("" if "" in it.metrics else None)
            if key is None:
                raise QcompareError(f"--compare: cell {cid} keeps per-item {', '.join(it.metrics)} for {task}, not "
                                    f"{name} (the table's metric)")
            if key == "":
                positional.add(task)
            per_cell[cid] = it
        sets = [set(it.ids) for it in per_cell.values()]
        shared = set.intersection(*sets)
        if not shared:
            raise QcompareError(f"--compare: the cells share no item of {task} (their task files differ)")
        if any(s != shared for s in sets):
            differ = [cid for cid, it in per_cell.items() if set(it.ids) != shared]
            notes.append(f"{task}: items differ between cells ({', '.join(differ)}): compared on the "
                         f"{len(shared)} items all cells share")
        order = [i for i in per_cell[next(iter(per_cell))].ids if i in shared]
        common[task] = order
    if positional:
        notes.append(f"{', '.join(sorted(positional))}: items of an older run, paired by position (no ids kept)")

    def side(cells):
        seeds = ["—" if pd.isna(s) else s for s in cells["seed"]]  # None/NaN: a cell without seed (nothing trained)
        scores, weights = {}, {}
        for task, name in plan.metric.items():
            rows, wrows = [], []
            for cid in cells["id"]:
                it = loaded[cid][task]
                key = name if name in it.metrics else ""
                where = {i: k for k, i in enumerate(it.ids)}
                rows.append([it.metrics[key][where[i]] for i in common[task]])
                if it.weights is not None:
                    wrows.append([it.weights[where[i]] for i in common[task]])
            scores[task] = np.asarray(rows, dtype=float)
            if len(wrows) == len(rows):
                weights[task] = np.asarray(wrows, dtype=float)
        return Side(list(seeds), scores, weights, trained=any(s != "—" for s in seeds))

    return side(cells_a), side(cells_b), notes


def compare(root: Path, a: str, b: str, metric: str = "average", margin: float | None = None,
            pool: bool = False) -> tuple[Comparison, pd.DataFrame, pd.DataFrame, Plan, list[str]]:
    df = load_run(root)
    if df.empty:
        raise QcompareError(f"no finished cells in {root}")
    cells_a, cells_b = select(df, a, pool), select(df, b, pool)
    result, plan, notes = compare_cells(root, df, cells_a, cells_b, metric, margin)
    return result, cells_a, cells_b, plan, notes


def compare_cells(root: Path, df: pd.DataFrame, cells_a: pd.DataFrame, cells_b: pd.DataFrame, metric: str = "average",
                  margin: float | None = None) -> tuple[Comparison, Plan, list[str]]:
    """A − B for two sets of cells (each one configuration's runs) of the run ``df`` was loaded from."""
    if set(cells_a["id"]) & set(cells_b["id"]):
        raise QcompareError("--compare: A and B select some of the same cells; make the selectors disjoint")
    plan = plan_statistic(df, metric)
    side_a, side_b, notes = sides(Path(root), cells_a, cells_b, plan)
    return bootstrap(side_a, side_b, plan.structure, margin), plan, notes


def describe_side(name: str, spec: str, cells: pd.DataFrame) -> str:
    labels = sorted({str(lbl).rsplit(" · seed ", 1)[0] for lbl in cells["label"]})
    seeds = [setting_text(s) for s in cells["seed"] if not pd.isna(s)]
    runs = f"{len(cells)} runs (seeds {', '.join(seeds)})" if seeds else "1 run (no training: no seed)"
    pooled = f" — {len(labels)} configurations pooled (--pool)" if len(labels) > 1 else ""
    return f"{name} = {spec}: {'; '.join(labels)} — {runs}{pooled}"


def comparison_lines(result: Comparison, plan: Plan) -> list[str]:
    sign = lambda x: f"{x:+.4f}"  # noqa: E731
    seeds = ("paired" if result.paired_seeds else "unpaired") if not result.one_seed else "one seed on a side"
    lines = [f"A − B on {plan.label}: [bold]{sign(result.difference)}[/]",
             f"  95% CI [{sign(result.low)}, {sign(result.high)}], 90% [{sign(result.low90)}, {sign(result.high90)}]; "
             f"SE {result.se:.4f} from training runs ({result.seeds_a} vs {result.seeds_b} seeds, {seeds}; "
             f"sd of a run's difference {result.seed_sd:.4f}) and items ({result.items:,} paired by id; "
             f"SE {result.item_se:.4f})"]
    margin = f" (margin ±{result.margin:g})" if result.margin is not None else " (no margin: give --margin to test equivalence)"
    lines.append(f"  → [bold]{result.verdict}[/]{margin}")
    return lines


def print_comparison(root: Path, a: str, b: str, console, metric: str = "average", margin: float | None = None,
                     pool: bool = False) -> Comparison:
    result, cells_a, cells_b, plan, notes = compare(root, a, b, metric, margin, pool)
    console.print(describe_side("A", a, cells_a), highlight=False)
    console.print(describe_side("B", b, cells_b), highlight=False)
    for line in comparison_lines(result, plan):
        console.print(line, highlight=False)
    for note in notes:
        console.print(f"  note: {note}", style="yellow", highlight=False)
    return result
