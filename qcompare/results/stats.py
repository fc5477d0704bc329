"""The statistics behind a table's "±" (comparisons and verdicts: qcompare.reports.verdicts)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054


def mean_ci(values, stderr: float | None = None) -> tuple[float, float | None, str | None]:
    """Mean, half-width of its 95% confidence interval, and what the interval is over.

    Several seeds: Student's t over the seeds (``"seeds"``; ``"seeds agree"`` when they are all
    equal: a zero-width interval that says the seeds agreed, not that there is no uncertainty).
    One seed: the evaluator's own stderr (lm-eval's, over items) times 1.96 (``"items"``).
    None when neither is known.
    """
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if vals.size == 0:
        return float("nan"), None, None
    if vals.size >= 2:
        sd = vals.std(ddof=1)
        half = sps.t.ppf(0.975, vals.size - 1) * sd / math.sqrt(vals.size)
        return float(vals.mean()), float(half), "seeds" if sd > 0 else "seeds agree"
    if stderr is not None and not math.isnan(stderr):
        return float(vals[0]), Z95 * stderr, "items"
    return float(vals[0]), None, None
