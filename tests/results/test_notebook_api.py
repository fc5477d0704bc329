"""The notebook API: ``load_run`` gives the numbers ``qcompare report`` prints."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.results import load_run  # the documented notebook API

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()


def test_load_run_means_equal_the_report_json(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out)]).exit_code == 0
    res = cli.invoke(app, ["report", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)

    df = load_run(out)  # one row per cell
    assert len(df) == 7 and {"id", "seed", "quantizer.bits", "distiller.max_steps", "probe/acc", "probe/kl",
                             "average", "memory_bytes", "bits_per_weight", "cost.total_seconds"} <= set(df.columns)
    assert len(report) == 5  # teacher, 2 × keep (seedless), 2 × nudge (2 seeds each)
    for row in report:
        mask = (df["quantizer"] == row["quantizer"]) & (df["distiller"] == row["distiller"])
        for col, value in row.items():
            if col.startswith(("quantizer.", "distiller.")) and value is not None:
                mask &= df[col].map(lambda v, want=value: (list(v) if isinstance(v, tuple) else v) == want)
        cells = df[mask]
        assert len(cells) == row["seeds"]
        for metric in ("probe/acc", "probe/kl", "average"):
            # the report's JSON keeps 10 decimal places (pandas' to_json default)
            assert cells[metric].mean() == pytest.approx(row[metric], rel=0, abs=1e-10), (row["config"], metric)
    # and a single cell's number is the one stored in its result.json
    one = df.iloc[-1]
    stored = json.loads((out / "cells" / one["id"] / "result.json").read_text())
    assert one["probe/kl"] == stored["metrics"]["probe/kl"]
