"""Reports: uncertainty, recovery, paired comparisons, pivots, exports and figures."""

import json

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.reports.tables import MIN_GAP, summarize
from qcompare.results.frame import load_run
from qcompare.results.stats import mean_ci

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

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

    from qcompare.sdk.registry import add_plugin, remove_plugin

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


@pytest.fixture
def extra_plugins():
    """A quantizer whose models cannot be saved and a second training distiller (a loss of its own),
    registered for one test."""
    import testplugins
    from unsavable import UnsavableRTN

    from qcompare import hookimpl
    from qcompare.sdk.registry import add_plugin, remove_plugin

    class Echo(testplugins.Nudge):
        name = "echo"

    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register(UnsavableRTN)

        @hookimpl
        def register_distillers(self, register):
            register(Echo)

    plugin = Plugin()
    add_plugin(plugin)
    yield
    remove_plugin(plugin)


def test_every_format_names_the_cells_it_leaves_out_and_the_models_not_saved(
        test_plugins, extra_plugins, write_recipe, tmp_path):
    import io

    import pandas as pd

    recipe = write_recipe(BASIC.replace('name = "rtn"\nbits = [8, 2]', 'name = "unsavable"\nbits = 8')
                          .replace("seeds = [0, 1]", "seeds = [0]\nsave_models = true")
                          .replace("max_steps = 2", "max_steps = 2\nfail = [false, true]"))
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(recipe), "-o", str(out)]).exit_code == 1
    records = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    [failed] = [r for r in records if r["status"] == "failed"]
    unsaved = sorted(r["id"] for r in records if r.get("save_error"))
    assert len(unsaved) == 2  # keep and nudge(fail=False); the teacher saves
    said = {}
    for fmt in ("table", "markdown", "latex", "csv", "json", "html"):
        res = cli.invoke(app, ["report", str(out), "--format", fmt, "--out", str(tmp_path / "report.html")],
                         env={"COLUMNS": "400"})
        assert res.exit_code == 0, res.output
        said[fmt] = (tmp_path / "report.html").read_text() if fmt == "html" else res.stdout
    for fmt, text in said.items():
        assert all(cell in text for cell in [failed["id"], *unsaved]), fmt
        assert "nudge was asked to fail" in text and "unsavable: this variant has no on-disk format" in text, fmt
    assert "1 cells not finished, left out of the tables" in said["markdown"].split("\n|")[-1]  # after the table
    latex = said["latex"].splitlines()
    after = latex[latex.index(r"\end{tabular}") + 1:]
    assert len(after) == 5 and all(line.startswith("% ") for line in after)  # comments: safe inside a float
    # csv and json: the same rows, each with the same keys; a cell that did not finish is a row of its own
    for rows in (pd.read_csv(io.StringIO(said["csv"]), comment="#"), pd.DataFrame(json.loads(said["json"]))):
        assert list(rows["kind"]) == ["teacher", "ptq", "distilled", "not finished"]
        gone = rows.iloc[-1]
        assert gone["cells"] == failed["id"] and gone["seeds"] == 0 and pd.isna(gone["average"])
        assert gone["error"].startswith("RuntimeError: nudge was asked to fail")
        assert sorted(c for text in rows["model not saved"].dropna() for c in unsaved if text.startswith(c)) == unsaved
        assert rows["error"].iloc[:-1].isna().all() and rows["average"].iloc[:-1].notna().all()


def test_a_cell_label_with_a_hash_survives_read_csv_with_comments(finished_run):
    import io

    import pandas as pd

    res = cli.invoke(app, ["report", str(finished_run), "--format", "csv"])
    rows = pd.read_csv(io.StringIO(res.stdout.replace("rtn(bits=2)", "rtn(bits=2)#x")), comment="#")
    assert len(rows) == 7 and rows["config"].str.contains("#x").sum() == 3 and rows["average"].notna().all()


def test_size_and_cost_columns_show_small_amounts_as_numbers():
    from qcompare.reports.tables import SIZE_AND_COST

    # a minute of GPU, a tiny model's training: not "0.000"
    assert SIZE_AND_COST["GPU h"](1 / 60) == "0.017" and SIZE_AND_COST["GPU h"](3 / 3600) == "0.00083"
    assert SIZE_AND_COST["TFLOP"](2.4e-6) == "2.4e-06" and SIZE_AND_COST["MB"](0.026) == "0.026"


def _figures_drawn(monkeypatch) -> dict:
    """Each figure write_figures saves, by file name: {file: figure}, kept open for the test to read."""
    import qcompare.reports.figures

    drawn, save = {}, qcompare.reports.figures._save

    def keep(fig, path):
        drawn[path.name] = fig
        fig.tight_layout()
        fig.savefig(path, dpi=50)
        return path

    monkeypatch.setattr(qcompare.reports.figures, "_save", keep)
    return drawn


def test_the_bar_chart_writes_each_configurations_number(finished_run, tmp_path, monkeypatch):
    drawn = _figures_drawn(monkeypatch)
    assert cli.invoke(app, ["report", str(finished_run), "--figures", str(tmp_path / "figs")]).exit_code == 0
    summary, _ = summarize(load_run(finished_run))
    [ax] = drawn["metric_per_configuration.png"].axes
    assert [t.get_text() for t in ax.texts] == [f"{v:.3f}" for v in summary["average"]]


def test_each_distillers_training_loss_has_axes_of_its_own(test_plugins, extra_plugins, write_recipe, tmp_path,
                                                            monkeypatch):
    recipe = write_recipe(BASIC.replace("bits = [8, 2]", "bits = 2").replace("seeds = [0, 1]", "seeds = [0]")
                          + '\n[[distillers]]\nname = "echo"\nmax_steps = 3\n')
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(recipe), "-o", str(out)]).exit_code == 0
    drawn = _figures_drawn(monkeypatch)
    assert cli.invoke(app, ["report", str(out), "--figures", str(tmp_path / "figs")]).exit_code == 0
    axes = drawn["loss_curves.png"].axes
    assert [ax.get_ylabel().split()[0] for ax in axes] == ["echo", "nudge"]  # SFT's and GKD's losses, say
    for ax in axes:
        [line] = ax.get_lines()
        assert ax.get_ylabel().split()[0] in line.get_label()


def test_a_distillers_settings_stay_out_of_its_label_where_they_do_not_differ(test_plugins, extra_plugins,
                                                                              write_recipe, tmp_path):
    # nudge and echo share their settings, which keep lacks: that is no difference worth a label
    recipe = write_recipe(BASIC.replace("bits = [8, 2]", "bits = 2") + '\n[[distillers]]\nname = "echo"\n')
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out), "--set", "seeds=[0]"])
    assert res.exit_code == 0, res.output
    summary, _ = summarize(load_run(out))
    assert {c.split(" · ")[1] for c in summary["config"] if " · " in c} == {"keep", "nudge", "echo"}
