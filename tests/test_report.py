"""Reports: uncertainty, recovery, paired comparisons, pivots, exports and figures."""

import json

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.report import MIN_GAP, summarize
from qcompare.results import load_run
from qcompare.stats import mean_ci

cli = CliRunner()


def test_mean_ci_says_what_its_interval_is_over():
    m, half, over = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and over == "seeds"
    assert half == pytest.approx(sps.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert mean_ci([0.5], stderr=0.01) == (0.5, pytest.approx(0.0196, abs=1e-4), "items")
    assert mean_ci([0.5]) == (0.5, None, None)
    assert mean_ci([0.95, 0.95]) == (0.95, 0.0, "seeds agree")


@pytest.fixture
def finished_run(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "distillers[1].max_steps=[1,3]",
                           "--set", "evaluators[0].sequences=16"])
    assert res.exit_code == 0, res.output
    return out


def test_summary_groups_seeds_and_computes_recovery(finished_run):
    df = load_run(finished_run)
    summary, metrics = summarize(df)
    assert "average" in metrics and list(summary["kind"]) == ["teacher", "ptq", "ptq"] + ["distilled"] * 4
    assert (summary.loc[summary["kind"] == "distilled", "seeds"] == 2).all()
    teacher = summary.loc[0, "average"]
    ptqs = summary[summary["kind"] == "ptq"].set_index("quantizer.bits")["average"]
    bits = (teacher - ptqs).idxmax()  # the bit width with the larger gap, so that recovery is computed
    ptq = ptqs[bits]
    assert teacher - ptq >= MIN_GAP
    row = summary[(summary["kind"] == "distilled") & (summary["quantizer.bits"] == bits)].iloc[0]
    cells = df[df["id"].isin(row["ids"])]
    assert row["average"] == pytest.approx(cells["average"].mean())
    assert row["recovered"] == pytest.approx((row["average"] - ptq) / (teacher - ptq))
    assert row["Δ teacher"] == pytest.approx(row["average"] - teacher)


@pytest.mark.parametrize("fmt, marker", [("markdown", "| configuration |"), ("latex", r"\begin{tabular}"),
                                         ("csv", "config,"), ("json", '"config"')])
def test_exports(finished_run, fmt, marker):
    res = cli.invoke(app, ["report", str(finished_run), "--format", fmt])
    assert res.exit_code == 0 and marker in res.output, res.output
    if fmt == "json":
        assert len(json.loads(res.output)) == 7


def test_compare_gives_interval_and_verdict(finished_run):
    # 8-bit RTN keeps the teacher's top-1 on every probe sequence, 2-bit loses it on many
    res = cli.invoke(app, ["report", str(finished_run), "--compare", "bits=8,distiller=keep", "bits=2,distiller=keep"])
    assert res.exit_code == 0, res.output
    # nothing trained on either side: no training variance, the items decide
    assert "95% CI" in res.output and "→ A better" in res.output and "16 paired by id" in res.output
    cell = load_run(finished_run).query("distiller == 'nudge'")["id"].iloc[0]
    res = cli.invoke(app, ["report", str(finished_run), "--compare", cell, cell])
    assert res.exit_code == 2 and "A and B select some of the same cells" in res.output
    bad = cli.invoke(app, ["report", str(finished_run), "--compare", "nosuch=1", "bits=2"])
    assert bad.exit_code == 2 and "unknown --compare setting 'nosuch'" in bad.output


def test_pivot_and_figures(finished_run, tmp_path):
    res = cli.invoke(app, ["report", str(finished_run), "--rows", "bits", "--cols", "max_steps", "--metric", "probe/acc",
                           "--figures", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert "bits \\ max_steps" in res.output
    pngs = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert pngs == ["loss_curves.png", "metric_per_configuration.png", "metric_vs_bits.png", "metric_vs_steps.png"]
    assert all((tmp_path / "figs" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert cli.invoke(app, ["report", str(finished_run), "--rows", "bits"]).exit_code == 2


def test_learning_rate_figure_has_a_line_per_lambda_like_setting(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "quantizers[0].bits=[2]",
                           "--set", "distillers[1].learning_rate=[0.001, 0.01, 0.1]"])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["report", str(out), "--figures", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figs" / "metric_vs_learning_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_cells_run_on_other_data_are_not_pooled_as_seeds(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "seeds=[0]"]).exit_code == 0
    again = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "seeds=[0]",
                             "--set", "evaluators[0].sequences=8"])
    assert again.exit_code == 0, again.output
    summary, _ = summarize(load_run(out))
    nudged = summary[summary["config"].str.contains("nudge")]
    assert len(nudged) == 4 and (nudged["seeds"] == 1).all()  # 2 bits × 2 setups, one seed each
    assert nudged["config"].str.contains("setup").all()


def test_figure_lines_never_pool_other_swept_settings(test_plugins, write_recipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "quantizers[0].bits=[2]",
                           "--set", "seeds=[0]", "--set", "distillers[1].learning_rate=[0.001, 0.1]",
                           "--set", "distillers[1].max_steps=[1, 2]"])
    assert res.exit_code == 0, res.output
    from matplotlib.axes import Axes

    lines, errorbar = [], Axes.errorbar

    def record(self, x, y, *args, **kwargs):
        if kwargs.get("label") not in (None, "_nolegend_"):  # the bar chart's error bars are unlabelled
            lines.append((kwargs["label"], [float(v) for v in x]))
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    res = cli.invoke(app, ["report", str(out), "--figures", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    # metric vs learning rate: one line per max_steps; metric vs steps: one line per learning rate
    assert lines == [("max_steps=1", [0.001, 0.1]), ("max_steps=2", [0.001, 0.1]),
                     ("learning_rate=0.001", [1, 2]), ("learning_rate=0.1", [1, 2])]


MIXED = """
name = "mixed"
models = ["{model}"]
seeds = [0]
[[quantizers]]
name = "rtn"
bits = 2
group_size = 16
[[quantizers]]
name = "nf3"
group_size = 32
[[quantizers]]
name = "torchao"
bits = 2
group_size = 32
[[distillers]]
name = "keep"
[[distillers]]
name = "nudge"
max_steps = 2
[[evaluators]]
name = "probe"
"""


def test_quantizers_with_different_parameters_each_get_their_own_ptq_baseline_and_full_labels(
        test_plugins, write_recipe, tmp_path, monkeypatch):
    import qcompare_nf3

    from qcompare.plugins import add_plugin, remove_plugin

    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,torchao")  # a built-in beside two third-party quantizers
    add_plugin(qcompare_nf3)
    try:
        out = tmp_path / "run"
        res = cli.invoke(app, ["run", str(write_recipe(MIXED)), "-o", str(out)])
        assert res.exit_code == 0, res.output
        summary, _ = summarize(load_run(out))
    finally:
        remove_plugin(qcompare_nf3)
    distilled = summary[summary["kind"] == "distilled"]
    assert len(distilled) == 3 and distilled["Δ PTQ"].notna().all()  # nudge, on each quantizer
    for _, row in distilled.iterrows():
        ptq = summary[(summary["kind"] == "ptq") & (summary["quantizer"] == row["quantizer"])]
        assert len(ptq) == 1 and row["Δ PTQ"] == pytest.approx(row["average"] - ptq["average"].iloc[0])
    labels = {row["quantizer"]: row["config"] for _, row in summary[summary["kind"] == "ptq"].iterrows()}
    # bits, which rtn and torchao share, differs from nf3's none: both labels keep it; torchao's own
    # defaults (symmetric, packing, ...) stay out
    assert labels["nf3"] == "nf3(group_size=32) · keep"
    assert labels["rtn"].startswith("rtn(") and {"bits=2", "group_size=16"} == set(labels["rtn"][4:-8].split(","))
    assert {"bits=2", "group_size=32"} == set(labels["torchao"][8:-8].split(",")), labels
