"""Experiment trackers: one run per cell, training curve and evaluation results together;
a tracker whose package is missing is one line naming the pip install."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
from typer.testing import CliRunner

import testplugins
from qcompare.cli import app
from qcompare.errors import QcompareError
from qcompare.sdk.extras import require
from qcompare.sdk.registry import add_plugin, remove_plugin

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()

RECIPE = """
name = "tracked"
models = ["toy-qwen3"]
seeds = [0]
teacher = false
report_to = {report_to}

[data]
train = "toy-chat"
subset = 8

[[quantizers]]
name = "torchao"
bits = 4

[[distillers]]
name = "sft"
max_steps = 2
max_length = 64
save_steps = 0

[[evaluators]]
name = "probe"
"""


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers,trackers")
    add_plugin(testplugins)
    yield
    remove_plugin(testplugins)


def write(tmp_path, report_to='["tensorboard"]', recipe=RECIPE):
    path = tmp_path / "tracked.toml"
    path.write_text(recipe.format(report_to=report_to))
    return path


def test_tensorboard_gets_the_training_curve_and_the_eval_results_of_each_cell(plugins, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write(tmp_path)), "-o", str(out)])
    assert res.exit_code == 0, res.output
    [cell_dir] = list((out / "cells").iterdir())
    record = json.loads((cell_dir / "result.json").read_text())
    events = EventAccumulator(str(cell_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert record["metrics"]
    assert "train/loss" in tags  # TRL's own TensorBoardCallback, same folder
    for key, value in record["metrics"].items():
        [point] = events.Scalars(f"eval/{key}")
        assert point.value == pytest.approx(value) and point.step == 2  # at the end of the training curve
    assert {"size/bits_per_weight", "cost/total_seconds"} <= tags


def test_wandb_logs_eval_results_to_a_run_named_by_the_cell(plugins, tmp_path, monkeypatch):
    # A stand-in wandb module: nothing online, but the calls a real one would get.
    calls = []

    class Run:
        def __init__(self, name, config):
            self.name, self.summary = name, {}
            calls.append(("init", name, config))

        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.run = None
    fake.init = lambda name, config: Run(name, config)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from qcompare_plugins.trackers import cell_finished

    record = {"id": "abc", "status": "done", "settings": {"seed": 0}, "metrics": {"toy/acc": 0.9},
              "stderr": {"toy/acc": 0.01}, "size": {"bits_per_weight": 4.5}, "cost": {"total_seconds": 3.0}}
    cell_finished(cell=None, cell_dir=tmp_path, record=record, report_to=["wandb"], run_name="r/cell one")
    assert calls[0] == ("init", "r/cell one", {"seed": 0})
    assert calls[1] == ("log", {"eval/toy/acc": 0.9, "eval/toy/acc_stderr": 0.01, "size/bits_per_weight": 4.5,
                                "cost/total_seconds": 3.0}, 0)
    assert calls[2] == ("finish",)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_validate_names_the_pip_install_of_a_missing_tracker(plugins, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # find_spec → None: as if not installed
    res = cli.invoke(app, ["validate", str(write(tmp_path, f'["{tracker}"]'))])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].endswith(f"report_to: tracker '{tracker}' needs the {tracker} package, "
                                                 f"which is not installed; pip install {tracker}")


def test_unknown_tracker_lists_the_allowed_ones(plugins, tmp_path):
    res = cli.invoke(app, ["validate", str(write(tmp_path, '["tensorbored"]'))])
    assert res.exit_code == 2 and "unknown tracker 'tensorbored'; allowed: tensorboard, wandb, mlflow" in res.output


def test_require_raises_one_line_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(QcompareError) as e:
        require("vllm", "vllm", "use_vllm = true")
    assert str(e.value) == "use_vllm = true needs the vllm package, which is not installed; pip install vllm"
