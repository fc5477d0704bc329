"""The statistics behind a report's "±" and its verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054


def mean_ci(values, stderr: float | None = None) -> tuple[float, float | None]:
    """Mean and half-width of its 95% confidence interval.

    Several seeds: Student's t over the seeds. One seed: the evaluator's own stderr
    (lm-eval's, over items) times 1.96. None when neither is known.
    """
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if vals.size == 0:
        return float("nan"), None
    if vals.size >= 2:
        half = sps.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size)
        return float(vals.mean()), float(half)
    return float(vals[0]), (Z95 * stderr if stderr is not None and not math.isnan(stderr) else None)


@dataclass
class Comparison:
    """A − B over paired items, with a bootstrap 95% interval and a plain verdict."""

    difference: float
    low: float
    high: float
    items: int
    tasks: list[str]

    @property
    def verdict(self) -> str:
        if self.low <= 0 <= self.high:
            return "within noise"
        return "A is better" if self.low > 0 else "B is better"


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], resamples: int = 10_000,
                     seed: int = 0) -> Comparison:
    """Bootstrap the difference of task-averaged scores, resampling items within each task.

    ``a`` and ``b`` map a task to per-item scores in the same item order; the statistic is
    the mean over tasks of (mean score of A − mean score of B), the way a multi-task
    average is reported.
    """
    tasks = sorted(set(a) & set(b))
    if not tasks:
        raise ValueError("the two sides share no task with per-item scores (they come from the lm_eval evaluator)")
    for t in tasks:
        if len(a[t]) != len(b[t]):
            raise ValueError(f"task {t}: A has {len(a[t])} items and B {len(b[t])}; "
                             "compare cells evaluated on the same items (the same limit)")
    rng = np.random.default_rng(seed)
    diffs = []
    for t in tasks:
        d = np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float)
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        diffs.append(d[idx].mean(axis=1))
    boot = np.mean(diffs, axis=0)
    point = float(np.mean([np.mean(np.asarray(a[t], float) - np.asarray(b[t], float)) for t in tasks]))
    low, high = np.percentile(boot, [2.5, 97.5])
    return Comparison(point, float(low), float(high), sum(len(a[t]) for t in tasks), tasks)
