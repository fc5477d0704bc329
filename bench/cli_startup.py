"""How long the commands that train nothing take, as a user runs them: whole processes, the
median of 5 runs after a warm-up, against the 1.5 s target.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cli_startup.py [RUN_FOLDER]

RUN_FOLDER (a finished run, for `report`; default: a run of the toy demo at one training step,
made first). `validate` is timed twice: warm (its model-layout checks cached, as on every run
after the first) and cold (a fresh cache: it builds each model from its config on the meta device,
importing torch and transformers once per model × quantizer × plugin version).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import median, table

ROOT = Path(__file__).resolve().parent.parent
QCOMPARE = [sys.executable, "-m", "qcompare"]
RECIPE = str(ROOT / "recipes" / "toy_int4.toml")
TARGET = 1.5


def seconds(args, env=None, runs=5, warmup=True) -> list[float]:
    times = []
    for i in range(runs + warmup):
        start = time.perf_counter()
        done = subprocess.run(QCOMPARE + args, capture_output=True, env={**os.environ, **(env or {})})
        if done.returncode not in (0, 1):
            raise SystemExit(f"qcompare {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
        if i or not warmup:  # the first run warms the file cache
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="qcompare-bench-")) / "run"
        subprocess.run(QCOMPARE + ["run", RECIPE, "-o", str(run), "--set", "seeds=[0]", "--set", "quantizers[0].bits=[4]",
                                   "--set", "distillers[1].max_steps=1", "--set", "distillers[2].max_steps=1"],
                       check=True, capture_output=True)
    rows = []
    for name, args, env in (("--help", ["--help"], None), ("plugins", ["plugins"], None),
                            ("validate (warm)", ["validate", RECIPE], None), ("plan", ["plan", RECIPE], None),
                            ("report", ["report", str(run)], None)):
        t = seconds(args, env)
        rows.append((name, f"{median(t):.2f}", f"{min(t):.2f}–{max(t):.2f}", "yes" if median(t) <= TARGET else "NO"))
    cold = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as cache:
            cold += seconds(["validate", RECIPE], {"QCOMPARE_CACHE": cache}, runs=1, warmup=False)
    rows.append(("validate (cold cache)", f"{median(cold):.2f}", f"{min(cold):.2f}–{max(cold):.2f}",
                 "once per model × quantizer"))
    table(rows, ("command", "median s", "range s", f"≤ {TARGET} s"))


if __name__ == "__main__":
    main()
