"""Reports: uncertainty, recovery, paired comparisons, pivots, exports and figures."""

import json

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.report import summarize
from qcompare.results import load_run
from qcompare.stats import mean_ci, paired_bootstrap

cli = CliRunner()


def test_mean_ci_uses_t_over_seeds_and_stderr_for_one_seed():
    m, half = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert half == pytest.approx(sps.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert mean_ci([0.5], stderr=0.01) == (0.5, pytest.approx(0.0196, abs=1e-4))
    assert mean_ci([0.5]) == (0.5, None)


def test_paired_bootstrap_tells_noise_from_a_real_difference():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)
    flipped = base.copy()
    flipped[:3] = 1 - flipped[:3]  # three items of 400 differ: noise
    noise = paired_bootstrap({"t": base}, {"t": flipped})
    assert noise.low <= 0 <= noise.high and noise.verdict == "within noise"
    better = np.maximum(base, rng.integers(0, 2, 400))  # A right wherever B is, and more
    real = paired_bootstrap({"t": better}, {"t": base})
    assert real.low > 0 and real.verdict == "A is better"
    assert real.difference == pytest.approx(better.mean() - base.mean())
    assert paired_bootstrap({"t": base}, {"t": better}).verdict == "B is better"


@pytest.fixture
def finished_run(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "distillers[1].max_steps=[1,3]"])
    assert res.exit_code == 0, res.output
    return out


def test_summary_groups_seeds_and_computes_recovery(finished_run):
    df = load_run(finished_run)
    summary, metrics = summarize(df)
    assert "average" in metrics and list(summary["kind"]) == ["teacher", "ptq", "ptq"] + ["distilled"] * 4
    assert (summary.loc[summary["kind"] == "distilled", "seeds"] == 2).all()
    row = summary[(summary["kind"] == "distilled")].iloc[0]
    cells = df[df["id"].isin(row["ids"])]
    assert row["average"] == pytest.approx(cells["average"].mean())
    teacher = summary.loc[0, "average"]
    ptq = summary[(summary["kind"] == "ptq") & (summary["quantizer.bits"] == row["quantizer.bits"])]["average"].iloc[0]
    if teacher != ptq:
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
    res = cli.invoke(app, ["report", str(finished_run), "--compare", "bits=8,max_steps=3", "bits=2,max_steps=3"])
    assert res.exit_code == 0, res.output
    assert "95% CI" in res.output and ("A is better" in res.output or "within noise" in res.output)
    bad = cli.invoke(app, ["report", str(finished_run), "--compare", "nosuch=1", "bits=2"])
    assert bad.exit_code == 2 and "unknown setting 'nosuch'" in bad.output


def test_pivot_and_figures(finished_run, tmp_path):
    res = cli.invoke(app, ["report", str(finished_run), "--rows", "bits", "--cols", "max_steps", "--metric", "probe/acc",
                           "--figures", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert "bits \\ max_steps" in res.output
    pngs = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert pngs == ["loss_curves.png", "metric_per_configuration.png", "metric_vs_steps.png"]
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
