"""``qcompare paper``: the founding study's tables from its run folders, as markdown and LaTeX,
with verdicts (qcompare.reports.verdicts) — the λ table, the learning-rate sweep (a figure per λ), short
vs long training, batch × rollout length at λ=1, the β appendix, compute cost on- vs
off-policy, and torchao vs GPTQ vs AWQ.

Each table reads the run of one study of ``recipes/paper/`` (``paper_<study>``) or of its toy
twin (``toy_paper_<study>``) under a runs folder; a study not run yet is listed as such.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from qcompare.reports.compare import compare_cells
from qcompare.errors import QcompareError
from qcompare.reports.tables import summarize
from qcompare.results.frame import group_columns, load_run, setting_text
from qcompare.results.stats import interval_text, mean_ci

STUDIES = ("lambda", "lr_sweep", "steps", "rollout", "beta", "quantizers")


@dataclass
class PaperTable:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def find_run(runs: Path, study: str) -> Path | None:
    for name in (f"paper_{study}", f"toy_paper_{study}"):
        if (runs / name / "cells").is_dir():
            return runs / name
    return None


def mean_text(g: pd.DataFrame, col: str) -> str:
    return interval_text(*mean_ci(g[col].tolist()), sep=" ± ") if col in g else "—"


def value_text(v) -> str:
    """``setting_text``, with a fractional float in ``:g`` form (0.1 + 0.2 shows as 0.3)."""
    return f"{v:g}" if isinstance(v, float) and not v.is_integer() else setting_text(v)


def _configs(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [g for _, g in df.groupby(group_columns(df), dropna=False, sort=False)]


def _verdict(root: Path, df: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame, margin: float | None,
             metric: str = "average") -> str:
    try:
        result, _, _ = compare_cells(root, df, a, b, metric, margin)
    except QcompareError as e:
        return f"n/a ({str(e).split(': ', 1)[-1][:60]})"
    return verdict_text(result)


def verdict_text(result, hint: bool = True) -> str:
    """"Δ [95% CI] verdict" of a comparison; without ``hint``, the verdict without what would settle it."""
    short = result.verdict.split(";")[0].replace("inconclusive — one seed per side", "inconclusive (1 seed)")
    return f"{result.difference:+.3f} [{result.low:+.3f}, {result.high:+.3f}] {short if hint else short.split(' — ')[0]}"


def final_losses(root: Path, g: pd.DataFrame) -> list[float]:
    """Each run's final training loss: the mean of its last ten logged losses."""
    from qcompare.results.store import open_run

    store = open_run(root)
    losses = []
    for cid in g["id"]:
        log = store.cell(cid).read_train_log()
        if log:
            tail = [r["loss"] for r in log[-10:] if "loss" in r]
            losses.append(sum(tail) / len(tail))
    return losses


def final_loss_text(root: Path, g: pd.DataFrame) -> str:
    losses = final_losses(root, g)
    return interval_text(*mean_ci(losses)[:2], sep=" ± ") if losses else "—"


def untrained_configs(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [g for g in _configs(df) if g["quantizer"].iloc[0] == "teacher" or pd.isna(g["seed"].iloc[0])]


def trained_configs(df: pd.DataFrame, **match) -> list[pd.DataFrame]:
    out = []
    for g in _configs(df):
        if pd.isna(g["seed"].iloc[0]):
            continue
        if all(c in g and g[c].iloc[0] == v for c, v in match.items()):
            out.append(g)
    return out


def config_label(g: pd.DataFrame, keys: list[str]) -> str:
    if g["quantizer"].iloc[0] == "teacher":
        return "teacher (float)"
    if pd.isna(g["seed"].iloc[0]):
        return f"{g['quantizer'].iloc[0]} without training (PTQ)"
    return ", ".join(f"{k.split('.')[-1]} = {value_text(g[k].iloc[0])}" for k in keys)


def lambda_table(root: Path, margin) -> PaperTable:
    df = load_run(root)
    rows = []
    summary, metrics = summarize(df)
    tasks = [m for m in metrics if m != "average" and "/" in m and not m.endswith(("/kl", "/top1_agree", "/ppl", "/nll"))]
    trained = sorted(trained_configs(df), key=lambda g: g["distiller.lmbda"].iloc[0])
    reference = next((g for g in trained if g["distiller.lmbda"].iloc[0] == 0), None)
    for g in untrained_configs(df) + trained:
        verdict = "reference" if g is reference else (
            _verdict(root, df, g, reference, margin) if reference is not None and not pd.isna(g["seed"].iloc[0]) else "")
        rows.append([config_label(g, ["distiller.lmbda"]), str(max(1, g["seed"].nunique())),
                     *(mean_text(g, t) for t in tasks), mean_text(g, "average"), verdict])
    return PaperTable("Main table: on-policy share λ (GKD) against off-policy (λ = 0)",
                      ["configuration", "seeds", *tasks, "average", "vs λ = 0: Δ [95% CI] verdict"], rows,
                      ["± is a 95% CI over seeds (Student's t); \"=\": the seeds agreed. Verdicts: qcompare report "
                       "--compare (seeds and items both resampled)" + (f", margin ±{margin:g}" if margin else "") + "."])


def lr_table(root: Path, margin, figures: Path | None) -> PaperTable:
    df = load_run(root)
    lrs = sorted(df["distiller.learning_rate"].dropna().unique()) if "distiller.learning_rate" in df else []
    lambdas = sorted(df["distiller.lmbda"].dropna().unique()) if "distiller.lmbda" in df else []
    rows = []
    for lam in lambdas:
        for metric_name, pick in (("average", lambda g: mean_text(g, "average")), ("final loss", lambda g: final_loss_text(root, g))):
            row = [f"λ = {value_text(lam)}: {metric_name}"]
            for lr in lrs:
                cells = trained_configs(df, **{"distiller.lmbda": lam, "distiller.learning_rate": lr})
                row.append(pick(cells[0]) if cells else "—")
            rows.append(row)
    made = []
    if figures is not None:
        from qcompare.reports.figures import write_figures

        made = [p for p in write_figures(root, figures / "lr_sweep", "average") if "learning_rate" in p.name]
    return PaperTable("Learning-rate sweep: average accuracy and final training loss per λ",
                      ["λ / metric", *(f"lr {value_text(v)}" for v in lrs)], rows,
                      ["The study's finding: lower learning rates generalise better despite higher training loss."],
                      made)


def steps_table(root: Path, margin) -> PaperTable:
    df = load_run(root)
    rows = []
    for lam in sorted(df["distiller.lmbda"].dropna().unique()):
        runs = sorted(trained_configs(df, **{"distiller.lmbda": lam}), key=lambda g: g["distiller.max_steps"].iloc[0])
        for g in runs:
            verdict = _verdict(root, df, g, runs[0], margin) if g is not runs[0] else "reference"
            rows.append([f"λ = {value_text(lam)}, {int(g['distiller.max_steps'].iloc[0])} steps", mean_text(g, "average"),
                         final_loss_text(root, g), verdict])
    return PaperTable("Short against long training", ["configuration", "average", "final loss",
                                                      "vs the shortest: Δ [95% CI] verdict"], rows,
                      ["The study's finding: the long run lowers the loss, the evaluation stays flat (a ceiling)."])


def rollout_table(root: Path, margin) -> PaperTable:
    df = load_run(root)
    batches = sorted(df["distiller.per_device_train_batch_size"].dropna().unique())
    lengths = sorted(df["distiller.max_new_tokens"].dropna().unique())
    rows = []
    for b in batches:
        row = [f"batch {int(b)}"]
        for n in lengths:
            cells = trained_configs(df, **{"distiller.per_device_train_batch_size": b, "distiller.max_new_tokens": n})
            row.append(f"{mean_text(cells[0], 'average')} ({cells[0]['cost.flops'].mean() / 1e12:.2g} TFLOP)"
                       if cells and "cost.flops" in cells[0] else (mean_text(cells[0], "average") if cells else "—"))
        rows.append(row)
    return PaperTable("Batch size × rollout length at λ = 1 (average, logical compute per cell)",
                      ["batch \\ rollout tokens", *(str(int(n)) for n in lengths)], rows)


def beta_table(root: Path, margin) -> PaperTable:
    df = load_run(root)
    rows = []
    for lam in sorted(df["distiller.lmbda"].dropna().unique()):
        runs = sorted(trained_configs(df, **{"distiller.lmbda": lam}), key=lambda g: g["distiller.beta"].iloc[0])
        ref = next((g for g in runs if g["distiller.beta"].iloc[0] == 0.5), runs[0] if runs else None)
        for g in runs:
            verdict = "reference" if g is ref else _verdict(root, df, g, ref, margin)
            rows.append([f"λ = {value_text(lam)}, β = {value_text(g['distiller.beta'].iloc[0])}", mean_text(g, "average"),
                         final_loss_text(root, g), verdict])
    return PaperTable("Appendix: the generalized JSD's β (0 forward KL … 1 reverse KL)",
                      ["configuration", "average", "final loss", "vs β = 0.5: Δ [95% CI] verdict"], rows,
                      ["β also scales the loss: the interpolated divergence shrinks toward 0 near either endpoint, so a "
                       "β sweep changes the effective step size as well (docs/scale.md)."])


def cost_table(root: Path, margin) -> PaperTable:
    df = load_run(root)
    rows = []
    for g in sorted(trained_configs(df), key=lambda g: g["distiller.lmbda"].iloc[0]):
        flops = g["cost.flops"].mean() / 1e12 if "cost.flops" in g else float("nan")
        share = (g["cost.rollout_seconds"] / g["cost.train_seconds"]).mean() if "cost.rollout_seconds" in g else float("nan")
        rows.append([f"λ = {value_text(g['distiller.lmbda'].iloc[0])}", mean_text(g, "average"), f"{flops:.3g}",
                     f"{g['cost.total_seconds'].mean():.0f}", f"{g['cost.tokens_generated'].mean():,.0f}",
                     "—" if math.isnan(share) else f"{share:.0%}"])
    return PaperTable("Compute: on-policy against off-policy (logical cost per cell: as if nothing were cached)",
                      ["λ", "average", "TFLOP", "time s", "tokens generated", "rollout share of training"], rows)


def quantizers_table(root: Path, margin, figures: Path | None = None) -> PaperTable:
    """Each quantizer and training against torchao's with the same training, on the average and,
    where the run measured it, on KL to the teacher: weight-only 4-bit formats that all keep the
    knowledge part on the KL first."""
    df = load_run(root)
    kl = next((c for c in df.columns if c.endswith("-vs-teacher/kl")), None)
    rows = []
    configs = _configs(df)

    def training(g: pd.DataFrame) -> tuple:
        lmbda = g["distiller.lmbda"].iloc[0] if "distiller.lmbda" in g else None
        return g["distiller"].iloc[0], None if pd.isna(lmbda) else lmbda

    for g in configs:
        if g["quantizer"].iloc[0] == "teacher":
            continue
        ref = next((h for h in configs if h["quantizer"].iloc[0] == "torchao" and training(h) == training(g)), None)
        verdicts = ["reference" if ref is g else (_verdict(root, df, g, ref, margin, metric) if ref is not None else "")
                    for metric in ["average"] + ([kl] if kl else [])]
        # the quantizer's variant and the training, as the cell's label says them (model and seed aside)
        name = re.sub(r" · seed \d+$", "", str(g["label"].iloc[0])).removeprefix(f"{g['model'].iloc[0]} · ")
        bits = g["bits_per_weight"].iloc[0] if "bits_per_weight" in g else float("nan")
        row = [name, str(max(1, g["seed"].nunique())), mean_text(g, "average"), "—" if bits != bits else f"{bits:.2f}",
               verdicts[0]]
        rows.append(row + ([mean_text(g, kl), verdicts[1]] if kl else []))
    made = []
    if figures is not None:
        from qcompare.reports.figures import write_figures

        made = [p for p in write_figures(root, figures / "quantizers", "average") if p.name == "metric_vs_bits.png"]
    columns = ["configuration", "seeds", "average", "true bits/weight", "vs torchao, same training: Δ [95% CI] verdict"]
    notes = ["true bits/weight: codes and block scales as the converted model stores them; the figure puts every "
             "configuration on that axis."]
    if kl:
        columns += [f"KL to the teacher ({kl.split('-vs-teacher')[0]})", "vs torchao: Δ KL [95% CI] verdict"]
        notes.append("KL: mean per-token KL(teacher ‖ model), lower is better; its verdict compares texts paired by id.")
    return PaperTable("Quantizers and formats at ~4 bits: integer grids (torchao, GPTQ, AWQ) and float formats "
                      "(NVFP4, MXFP4, NF4)", columns, rows, notes, made)


def build(runs: Path, figures: Path | None = None, margin: float | None = None) -> tuple[list[PaperTable], list[str]]:
    makers = {"lambda": lambda r: [lambda_table(r, margin), cost_table(r, margin)],
              "lr_sweep": lambda r: [lr_table(r, margin, figures)],
              "steps": lambda r: [steps_table(r, margin)], "rollout": lambda r: [rollout_table(r, margin)],
              "beta": lambda r: [beta_table(r, margin)], "quantizers": lambda r: [quantizers_table(r, margin, figures)]}
    tables, missing = [], []
    for study in STUDIES:
        root = find_run(Path(runs), study)
        if root is None or load_run(root).empty:
            missing.append(study)
            continue
        for table in makers[study](root):
            table.title += f" — {root.name}"
            tables.append(table)
    return tables, missing


def markdown(tables: list[PaperTable], missing: list[str]) -> str:
    out = ["# The founding study's tables", ""]
    for t in tables:
        out += [f"## {t.title}", ""] + table_lines(t)
    if missing:
        out += [f"Not run yet: {', '.join(f'paper_{s} (or toy_paper_{s})' for s in missing)}.", ""]
    return "\n".join(out)


def table_lines(t: PaperTable) -> list[str]:
    """A table as markdown, its notes and figures after it."""
    out = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    out += ["| " + " | ".join(r) + " |" for r in t.rows]
    return out + [""] + [f"*{n}*" for n in t.notes] + [f"![{p.stem}]({p})" for p in t.figures] + [""]


def latex(tables: list[PaperTable]) -> str:
    esc = lambda s: (s.replace("\\", "\\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
                     .replace("λ", r"$\lambda$").replace("β", r"$\beta$").replace("Δ", r"$\Delta$").replace("×", r"$\times$")
                     .replace("—", "--").replace("≈", r"$\approx$"))
    out = []
    for t in tables:
        out += [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(t.columns) - 1) + "}",
                r"\toprule", " & ".join(esc(c) for c in t.columns) + r" \\", r"\midrule"]
        out += [" & ".join(esc(c) for c in r) + r" \\" for r in t.rows]
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(t.title)}}}", r"\end{table}", ""]
    return "\n".join(out)


def write(runs: Path, out: Path, margin: float | None = None) -> tuple[Path, Path, list[str]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, missing = build(runs, out / "figures", margin)
    if not tables:
        raise QcompareError(f"no study of recipes/paper/ has a run folder under {runs} (paper_<study> or "
                            f"toy_paper_<study>, studies: {', '.join(STUDIES)}); run them first")
    (out / "tables.md").write_text(markdown(tables, missing))
    (out / "tables.tex").write_text(latex(tables))
    return out / "tables.md", out / "tables.tex", missing
