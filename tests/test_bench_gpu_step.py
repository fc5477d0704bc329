"""bench/gpu_step.py is the GPU check a session runs when a device machine is lent: its code
path (random Qwen3, torchao QAT student, qcompare's gkd distiller, step snapshots) must work
before the device time is spent. Here it runs at the tiny shape on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_step_bench_runs_both_lambdas_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--shape", "tiny", "--device", "cpu",
                           "--batch", "2", "--prompt", "8", "--answer", "8", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["lambda"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {0.0, 1.0}
    off, on = rows[0.0], rows[1.0]
    assert off["steps"] == on["steps"] == 2
    # λ=0: no rollouts, the teacher runs every step; λ=1: the student generates its answers
    assert off["rollout_share"] == 0 and off["teacher_share"] > 0 and off["student_tokens_per_s"] > 0
    assert on["rollout_share"] > 0 and on["generated_tokens_per_s"] > 0
    assert off["tflops"] > 0 and off["fraction_of_peak"] is None  # no peak known for a CPU
    assert "of bf16 peak" in proc.stdout
