"""PNG figures of a run: metric vs learning rate per λ, loss curves, metric vs steps, per quantizer,
and metric vs true bits per weight (the formats' Pareto front)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from qcompare.reports.tables import _fmt, _varying, summarize  # noqa: E402
from qcompare.results.frame import group_columns, load_run, setting_text  # noqa: E402
from qcompare.results.stats import mean_ci  # noqa: E402
from qcompare.results.store import open_run  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _metric_vs(df: pd.DataFrame, x: str, metric: str, path: Path, xlabel: str, log: bool) -> Path | None:
    """One line per configuration of every other setting the run sweeps (λ, β, steps, bits,
    quantizer, ...), mean ± 95% CI over seeds: a line never pools different configurations."""
    part = df[df[x].notna()] if x in df else df.iloc[0:0]
    if part.empty or part[x].nunique() < 2:
        return None
    swept = [c for c in ("model", "quantizer", "distiller") if c in df and df[c].astype(str).nunique() > 1]
    swept += _varying(df, group_columns(df))
    # A setting constant among the cells drawn here splits nothing; it would only lengthen the labels.
    series_keys = [c for c in swept if c != x and part[c].astype(str).nunique() > 1]
    groups = part.groupby(series_keys, dropna=False) if series_keys else [((), part)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, g in groups:
        pts = [(xv, *mean_ci(h[metric].tolist())[:2]) for xv, h in g.groupby(x)]
        xs, ms, hs = zip(*pts)
        # a tuple, not np.atleast_1d: that turns mixed keys ("nudge", 2.0) into strings ("2.0", "nan")
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k.split('.')[-1]}={setting_text(v)}" for k, v in zip(series_keys, key) if pd.notna(v))
        ax.errorbar(xs, ms, yerr=[h or 0 for h in hs], marker="o", capsize=3,
                    label=label or ", ".join(sorted(part["distiller"].astype(str).unique())))
    teacher = df[df["quantizer"] == "teacher"]
    if not teacher.empty:
        ax.axhline(teacher[metric].mean(), color="k", ls="--", lw=1, label="teacher")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _loss_curves(root: Path, df: pd.DataFrame, path: Path) -> Path | None:
    """Training loss against step, mean over seeds, a line per configuration: each distiller on axes
    of its own, since each logs its own quantity (SFT a cross-entropy, GKD a divergence)."""
    store = open_run(root)
    lines: dict[str, list] = {}
    for (distiller, label), g in df[df["seed"].notna()].groupby(["distiller", "label_noseed"]):
        curves = []
        for cid in g["id"]:
            rows = store.cell(cid).read_train_log()
            if rows:
                curves.append([(r["step"], r["loss"]) for r in rows if "loss" in r])
        if not curves:
            continue
        steps = sorted({s for c in curves for s, _ in c})
        lines.setdefault(distiller, []).append((label, steps, [np.mean([dict(c).get(s, np.nan) for c in curves])
                                                               for s in steps]))
    if not lines:
        return None
    fig, axes = plt.subplots(len(lines), 1, figsize=(5.5, 1.2 + 2.8 * len(lines)), squeeze=False)
    for ax, (distiller, drawn) in zip(axes[:, 0], lines.items()):
        for label, steps, mean in drawn:
            ax.plot(steps, mean, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{distiller} loss\n(mean over seeds)")
        ax.legend(fontsize=6)
    return _save(fig, path)


def _per_quantizer(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    summary, _ = summarize(df)
    # the teacher alone is nothing to compare (its one bar filled the figure: a black block)
    if metric not in summary or (summary["kind"] == "teacher").all():
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(summary)), 4.2))
    colors = summary["kind"].map({"teacher": "k", "ptq": "tab:red", "distilled": "tab:blue"})
    half = summary[f"{metric} ±"].fillna(0)
    ax.bar(range(len(summary)), summary[metric], yerr=half, color=colors, capsize=3)
    for i, (value, h) in enumerate(zip(summary[metric], half)):  # the number, above its error bar
        ax.annotate(_fmt(value), (i, value + h), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
    ax.margins(y=0.08)
    ax.set_xticks(range(len(summary)), summary["config"], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(metric)
    ax.set_title("teacher (black) · post-training quantization (red) · distilled (blue)", fontsize=8)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats: none has fewer (or as few) bits and a higher (or as high)
    metric, one of them strictly. Sorted by bits."""
    front = [(b, m) for b, m in points
             if not any(b2 <= b and m2 >= m and (b2, m2) != (b, m) for b2, m2 in points)]
    return sorted(set(front))


def _pareto(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Metric (mean ± 95% CI) against the true bits per quantized weight: a colour per quantizer,
    a marker per training, the front of the best trade-offs as a step line. Points of one width
    are spread a little sideways so that none hides another. Needs two or more widths."""
    summary, _ = summarize(df)
    if metric not in summary or summary.empty:
        return None
    rows = summary[(summary["kind"] != "teacher") & summary["bits/weight"].notna() & summary[metric].notna()].copy()
    if rows.empty or rows["bits/weight"].round(3).nunique() < 2:
        return None
    rows["format"] = rows["config"].str.split(" · ").str[0]
    rows["training"] = rows["config"].str.split(" · ").str[1:].str.join(" · ")
    formats, trainings = list(dict.fromkeys(rows["format"])), list(dict.fromkeys(rows["training"]))
    colors = plt.get_cmap("tab10")
    markers = "soD^vP*Xh<>"
    span = rows["bits/weight"].max() - rows["bits/weight"].min()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for _, at_width in rows.groupby(rows["bits/weight"].round(3)):
        for k, (_, r) in enumerate(at_width.iterrows()):
            dx = (k - (len(at_width) - 1) / 2) * span * 0.012
            f, t = formats.index(r["format"]), trainings.index(r["training"])
            ax.errorbar(r["bits/weight"] + dx, r[metric], yerr=0 if pd.isna(r[f"{metric} ±"]) else r[f"{metric} ±"],
                        fmt=markers[t % len(markers)], color=colors(f % 10), capsize=2, ms=5, lw=0.8)
    front = pareto_front(list(zip(rows["bits/weight"], rows[metric])))
    if len(front) > 1:
        ax.step([b for b, _ in front], [m for _, m in front], where="post", color="gray", lw=1, ls=":")
    teacher = summary[summary["kind"] == "teacher"]
    if not teacher.empty:
        ax.axhline(teacher[metric].mean(), color="k", ls="--", lw=1)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i % 10), marker="o", ls="", label=f) for i, f in enumerate(formats)]
    handles += [Line2D([], [], color="gray", marker=markers[i % len(markers)], ls="", label=t or "—")
                for i, t in enumerate(trainings)]
    handles += [Line2D([], [], color="gray", ls=":", label="Pareto front")] + \
        ([Line2D([], [], color="k", ls="--", label="teacher")] if not teacher.empty else [])
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("true bits per quantized weight (codes + block scales as stored)")
    ax.set_ylabel(metric)
    ax.set_title("colour: quantizer · marker: training · bars: 95% CI", fontsize=8)
    return _save(fig, path)


def write_figures(root: str | Path, folder: str | Path, metric: str = "average") -> list[Path]:
    """Write every figure the run has data for; return their paths."""
    root, folder = Path(root), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    df = load_run(root)
    if df.empty or metric not in df:
        return []
    df["label_noseed"] = df["label"].str.replace(r" · seed \d+$", "", regex=True)
    made = [
        _metric_vs(df, "distiller.learning_rate", metric, folder / "metric_vs_learning_rate.png", "learning rate", True),
        _metric_vs(df, "distiller.max_steps", metric, folder / "metric_vs_steps.png", "training steps", False),
        _loss_curves(root, df, folder / "loss_curves.png"),
        _per_quantizer(df, metric, folder / "metric_per_configuration.png"),
        _pareto(df, metric, folder / "metric_vs_bits.png"),
    ]
    return [p for p in made if p is not None]
