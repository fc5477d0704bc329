"""bench/gpu_check.py is what a session runs when a device machine is lent: its code path (bench/gpu_step.py's
random Qwen3, torchao QAT student, qcompare's gkd distiller, step snapshots; then a recipe end to end) must work
before the device time is spent. Here it runs at the tiny shape on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_end_to_end_at_a_tiny_shape_on_cpu(tmp_path):
    # what a lent GPU machine runs first (bench/gpu_check.py): the step bench and a recipe end to
    # end, one JSON; here the CPU rehearsal of the same code path
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    step = result["step"]
    assert set(step) == {"lambda0", "lambda0_compiled_rounding", "lambda1", "lambda1_dynamic"}
    assert not any("error" in r for r in step.values())
    assert step["lambda1"]["rollouts"] == "static" and step["lambda1_dynamic"]["rollouts"] == "dynamic"
    assert step["lambda0"]["loss"] == "chunked" and step["lambda1"]["decode_ms_per_step"] > 0
    # bench/gpu_step.py's rows: λ=0 has no rollouts and runs the teacher every step; at λ=1 the student generates
    off, on = step["lambda0"], step["lambda1"]
    assert off["steps"] == on["steps"] == 1
    assert off["rollout_share"] == 0 and off["teacher_share"] > 0 and off["student_tokens_per_s"] > 0
    assert on["rollout_share"] > 0 and on["generated_tokens_per_s"] > 0
    assert off["tflops"] > 0 and off["fraction_of_peak"] is None  # no peak known for a CPU
    assert len(result["peaks"]) == 3 and all(r["estimated_gib"] > 0 for r in result["peaks"].values())
    assert "λ=1 step (batch 2)" in proc.stdout and "rollout, static copy" in proc.stdout
    cells = result["end_to_end"]["cells"]
    assert len(cells) == 3 and all(c["status"] == "done" and not c["save_error"] for c in cells)
    trained = [c for c in cells if "gkd" in c["label"]]
    assert all(c["checks"]["reload"]["passed"] and c["checks"]["fake_vs_converted"]["passed"] for c in trained)
    rollouts = result["end_to_end"]["rollouts"]
    assert rollouts["dynamic"]["tokens_per_s"] > 0 and "greedy_tokens_identical" in rollouts
    wheels = (ROOT / "bench" / "gpu_wheels.txt").read_text()
    assert all(f"{name}==" in wheels for name in ("trl", "torchao", "lm_eval", "datasets"))
