"""One cell on several processes (docs/scale.md): `torchrun -m qcompare run` on CPU, gloo on
loopback. Every process trains the cell data-parallel; the first one writes and reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from qcompare.cli import app
import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

RECIPE = """
name = "ddp"
models = ["toy-qwen3"]
device = "cpu"
teacher = false
[data]
train = "toy-chat"
subset = 64
[[quantizers]]
name = "torchao"
bits = 4
group_size = 32
[[distillers]]
name = "gkd"
lmbda = 0.0
learning_rate = 1e-3
per_device_train_batch_size = {batch}
max_length = 64
max_steps = 3
save_steps = 0
[[evaluators]]
name = "kl_to_teacher"
dataset = "toy-heldout"
max_samples = 20
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_record(run: Path) -> dict:
    (cell,) = (run / "cells").iterdir()
    return json.loads((cell / "result.json").read_text())


def test_torchrun_trains_one_cell_on_two_processes_and_reports_once(tmp_path):
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(RECIPE.format(batch=4))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), "-m", "qcompare", "run", str(recipe), "-o", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("toy-qwen3: accuracy") == 1  # the report, from the first process only
    assert proc.stderr.count("— done") == 1  # progress lines too
    ddp = only_record(tmp_path / "ddp")
    assert ddp["status"] == "done" and ddp["provenance"]["processes"] == 2 and ddp["cost"]["processes"] == 2
    log = (tmp_path / "ddp" / "cells" / ddp["id"] / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]

    # 2 processes x 4 sequences see what one process sees with 8 per step: the cell's token
    # counts are the sum over processes, not the first process's half
    recipe.write_text(RECIPE.format(batch=8))
    res = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    one = only_record(tmp_path / "one")
    assert one["cost"]["processes"] == 1
    assert ddp["cost"]["student_tokens"] == one["cost"]["student_tokens"] > 0
    assert ddp["cost"]["steps"] == one["cost"]["steps"] == 3
