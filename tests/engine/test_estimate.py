"""A price before the run: `plan` estimates each cell's FLOPs and time from the model's size and
the tokens its distiller plans, calibrated by the run folder's finished cells; the runner keeps the
estimate and `report` sets it against what the cells took."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from qcompare.cli import app
from qcompare.engine.estimate import logical_flops
from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams
from qcompare_plugins.distillers.sft import SFTDistiller, SFTParams

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()

RECIPE = """
name = "priced"
models = ["toy-qwen3"]
seeds = [0]

[data]
train = "toy-chat"

[[quantizers]]
name = "torchao"
bits = 4

[[distillers]]
name = "sft"
max_steps = 4
per_device_train_batch_size = 4
max_length = 64

[[evaluators]]
name = "lm_eval"
tasks = ["toy_arith"]
limit = 6
"""


def test_the_distillers_plan_their_tokens_from_their_parameters():
    sft = SFTParams(max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=100)
    assert SFTDistiller().planned_tokens(sft) == {"student_tokens": 8000}
    gkd = GKDParams(max_steps=10, per_device_train_batch_size=4, max_length=100, max_new_tokens=20, lmbda=0.25,
                    seq_kd=True)
    tokens = GKDDistiller().planned_tokens(gkd)
    assert tokens["student_tokens"] == tokens["teacher_tokens"] == 4000
    assert tokens["student_rollout_tokens"] == 1000 and tokens["teacher_rollout_tokens"] == 3000
    assert tokens["generated_tokens"] == 40 * 20  # λ of the batches by the student, the rest by the teacher
    assert logical_flops(10, 20, tokens) == 6 * 10 * 4000 + 2 * 20 * 4000 + 2 * 10 * 1000 + 2 * 20 * 3000


@pytest.fixture
def priced(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers,evaluators")
    recipe = tmp_path / "priced.toml"
    recipe.write_text(RECIPE)
    return recipe


def _total(output: str) -> tuple[float, str]:
    m = re.search(r"to run: \d+ cells, ([0-9.e+]+) TFLOP, about (.+?) on cpu", output)
    assert m, output
    return float(m.group(1)), output


def test_plan_prices_the_cells_and_the_report_checks_the_price(priced, tmp_path):
    run = tmp_path / "run"
    res = cli.invoke(app, ["plan", str(priced), "-o", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "TFLOP" in res.output and "assumed for cpu" in res.output
    upper, _ = _total(res.output)  # every sequence at max_length: an upper bound
    assert cli.invoke(app, ["run", str(priced), "-o", str(run)]).exit_code == 0

    # a second seed, priced from the first: sequences as long as measured, the measured rates
    res = cli.invoke(app, ["plan", str(priced), "-o", str(run), "--device", "cpu", "--set", "seeds=[0,1]"])
    assert res.exit_code == 0, res.output
    assert "measured in this run folder" in res.output and "of max_length" in res.output
    calibrated, _ = _total(res.output)
    assert calibrated < upper
    assert cli.invoke(app, ["run", str(priced), "-o", str(run), "--set", "seeds=[0,1]"]).exit_code == 0
    records = [json.loads(p.read_text()) for p in run.glob("cells/*/result.json")]
    second = next(r for r in records if r["settings"]["seed"] == 1)
    assert second["estimate"]["flops"] == pytest.approx(second["cost"]["flops"], rel=0.25)
    res = cli.invoke(app, ["report", str(run)])
    assert "actual cost / the estimate made before each cell ran" in res.output
