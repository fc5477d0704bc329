"""The statistics behind a table's "±" (comparisons and verdicts: qcompare.reports.verdicts)."""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054


class IntervalKind(StrEnum):
    """What a 95% interval is over. A ``str`` whose value is the plain word, so summary rows, their CSV
    and JSON, and code that compares to ``"seeds agree"`` read the same as before it was typed."""

    SEEDS = "seeds"  # Student's t over the seeds
    SEEDS_AGREE = "seeds agree"  # every seed gave the same value: a zero-width interval
    ITEMS = "items"  # one run: the evaluator's own stderr over items


def mean_ci(values, stderr: float | None = None) -> tuple[float, float | None, IntervalKind | None]:
    """Mean, half-width of its 95% confidence interval, and what the interval is over.

    Several seeds: Student's t over the seeds (``SEEDS``; ``SEEDS_AGREE`` when they are all
    equal: a zero-width interval that says the seeds agreed, not that there is no uncertainty).
    One seed: the evaluator's own stderr (lm-eval's, over items) times 1.96 (``ITEMS``).
    None when neither is known.
    """
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if vals.size == 0:
        return float("nan"), None, None
    if vals.size >= 2:
        sd = vals.std(ddof=1)
        half = sps.t.ppf(0.975, vals.size - 1) * sd / math.sqrt(vals.size)
        return float(vals.mean()), float(half), IntervalKind.SEEDS if sd > 0 else IntervalKind.SEEDS_AGREE
    if stderr is not None and not math.isnan(stderr):
        return float(vals[0]), Z95 * stderr, IntervalKind.ITEMS
    return float(vals[0]), None, None


def interval_text(mean, half=None, kind=None, *, number=lambda v: f"{v:.3f}", sep: str = "±") -> str:
    """A mean and its 95% half-width as a table shows them: ``0.812±0.014`` (``sep`` between them).

    ``0.812=`` where the seeds agreed exactly: no spread was seen, which ``±0.000`` would misread as
    no uncertainty. The mean alone where the half-width is unknown or not wanted (``half=None``);
    "—" where the mean is unknown. ``number`` writes the mean (a table's own rule for large values).
    """
    if mean is None or math.isnan(mean):
        return "—"
    text = number(mean)
    if kind == IntervalKind.SEEDS_AGREE:
        return text + "="
    return text if half is None or math.isnan(half) else f"{text}{sep}{half:.3f}"


def interval_label(kind, seeds: int) -> str:
    """What a table's "± over" column says of an interval: its kind and how many seeds it is over."""
    labels = {IntervalKind.SEEDS: f"t, {seeds} seeds", IntervalKind.SEEDS_AGREE: f"{seeds} seeds, equal",
              IntervalKind.ITEMS: "items (1 run)"}
    return labels.get(kind, "—")
