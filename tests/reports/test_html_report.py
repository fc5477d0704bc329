"""`qcompare report RUN --format html`: one self-contained file with the tables and their
intervals, the figures and a section per cell, as headless Chromium renders it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "test-artifacts"  # the screenshot is kept here (build/ is not tracked)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (.ci/run installs Debian's chromium)")
def test_the_html_report_renders_its_tables_figures_and_cells(test_plugins, write_recipe, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(BASIC.replace("max_steps = 2", "max_steps = 2\nfail = [false, true]"))
    assert cli.invoke(app, ["run", str(recipe), "-o", str(run)]).exit_code == 1  # some cells fail on purpose
    res = cli.invoke(app, ["report", str(run), "--format", "html", "--out", str(tmp_path / "report.html")])
    assert res.exit_code == 0, res.output
    page = tmp_path / "report.html"
    source = page.read_text()
    assert "src=\"http" not in source and "<script" not in source  # self-contained: nothing fetched

    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))
    for expected in ("accuracy", "size and cost", "± over", "2 seeds", "rtn(bits=2) · nudge(fail=False)",
                     "bits/weight", "metric per configuration", "Cells (", "fake_vs_converted", "coverage",
                     "passed", "failed", "nudge was asked to fail", "a re-run fails the same way", "settings",
                     "provenance", "loss curve"):
        assert expected in text, expected
    cells = {p.name for p in (run / "cells").iterdir()}
    assert cells == set(re.findall(r'id="cell-([0-9a-f]+)"', dom.stdout))  # a section per cell
    assert dom.stdout.count("data:image/png;base64,") >= 3  # figures and loss curves, embedded

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "html-report.png"
    made = chromium(f"--screenshot={shot}", "--window-size=1400,2000", page.as_uri())
    assert made.returncode == 0 and shot.is_file(), made.stderr
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1400) and pixels.std() > 0.05  # rendered, not a blank page


def _html(run: Path, tmp_path: Path) -> str:
    res = cli.invoke(app, ["report", str(run), "--format", "html", "--out", str(tmp_path / "report.html")])
    assert res.exit_code == 0, res.output
    return (tmp_path / "report.html").read_text()


def test_the_html_tables_show_the_columns_rows_are_compared_on_first_beside_a_fixed_configuration_column(
        test_plugins, write_recipe, tmp_path):
    run = tmp_path / "run"
    assert cli.invoke(app, ["run", str(write_recipe(BASIC.replace("seeds = [0, 1]", "seeds = [0]"))),
                            "-o", str(run)]).exit_code == 0
    source = _html(run, tmp_path)
    accuracy = source[source.index(": accuracy"):]
    heads = re.findall(r"<th>([^<]*)</th>", accuracy[:accuracy.index("</thead>")])
    # on a laptop a wide table scrolls sideways: these come before the tasks, the configuration stays in view
    assert heads[:7] == ["configuration", "seeds", "± over", "average", "Δ teacher", "Δ PTQ", "recovered"]
    assert heads[7:] == ["probe/acc", "probe/kl"]
    assert re.search(r"\.wide td:first-child, \.wide th:first-child \{ position: sticky; left: 0;", source)


@pytest.mark.parametrize("recipe_body", [
    'name = "t"\nmodels = ["{model}"]\n[[evaluators]]\nname = "probe"\n',
    BASIC.replace("seeds = [0, 1]", "seeds = [0]").replace("bits = [8, 2]", "bits = 2")
         .replace('name = "keep"', 'name = "nudge"\nfail = true').replace("max_steps = 2", "fail = true"),
], ids=["teacher only", "every quantized cell failed"])
def test_a_run_with_only_its_teacher_says_so_instead_of_drawing_one_black_bar(test_plugins, write_recipe, tmp_path,
                                                                             recipe_body):
    run = tmp_path / "run"
    ran = cli.invoke(app, ["run", str(write_recipe(recipe_body)), "-o", str(run)])
    assert (run / "cells").is_dir(), ran.output
    source = _html(run, tmp_path)
    figures = source[source.index("<h2>Figures</h2>"):source.index("<h2>Cells")]
    assert "<img" not in figures
    assert "No figures: only the teacher finished" in figures
    from qcompare.reports.figures import write_figures

    assert write_figures(run, tmp_path / "figs") == []  # the bar chart of one teacher bar was the black block
