"""Ray: resident actors (a runner per worker slot, kept across cells) against a task per cell
(every cell rebuilds its runner and reloads the teacher, tokenizer and data).

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_workers.py [--cells 8]

A sweep of cheap cells (the toy model, torchao INT4 at several group sizes, no training, KL to the
teacher on 20 held-out texts) on a local Ray with 2 CPUs, once each way, in fresh run folders:
wall time, and the seconds each cell took outside its own phases (loading its inputs, building
a runner). Prints the per-cell overhead of both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

GROUPS = [16, 32, 64, 0, 16, 32, 64, 0, 16, 32]
RECIPE = """
name = "ray-bench"
models = ["toy-qwen3"]
teacher = false
[[quantizers]]
name = "torchao"
bits = [2, 4]
group_size = {groups}
[[distillers]]
name = "none"
[[evaluators]]
name = "kl_to_teacher"
dataset = "toy-heldout"
max_samples = 20
[executor]
name = "ray"
local_cpus = 2
resident = {resident}
"""


def run(folder: Path, cells: int, resident: bool) -> tuple[float, list[dict]]:
    groups = sorted(set(GROUPS[: max(1, cells // 2)]))
    recipe = folder / f"ray-{resident}.toml"
    recipe.write_text(RECIPE.format(groups=json.dumps(groups), resident=str(resident).lower()))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="qr"), "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qcompare", "run", str(recipe), "-o", str(folder / f"run-{resident}")],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    records = [json.loads(p.read_text()) for p in (folder / f"run-{resident}").glob("cells/*/result.json")]
    return wall, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8)
    args = parser.parse_args()
    rows, walls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for resident in (False, True):
            wall, records = run(Path(tmp), args.cells, resident)
            phases = sum(r["cost"]["total_seconds"] for r in records)
            start = min(r["started_at"] for r in records)
            walls[resident] = wall
            rows.append(("resident actors" if resident else "a task per cell", len(records), f"{wall:.1f}",
                         f"{phases / len(records):.2f}", len({r['provenance']['pid'] for r in records}), start[:19]))
    table(rows, ("ray", "cells", "wall_s", "cell_phases_s", "processes", "first cell started"))
    n = rows[0][1]
    print(f"\nwall per cell: a task each {walls[False] / n:.2f} s, resident {walls[True] / n:.2f} s "
          f"(ratio {walls[True] / walls[False]:.2f}); both include starting Ray")


if __name__ == "__main__":
    main()
