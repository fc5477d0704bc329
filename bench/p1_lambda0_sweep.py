"""P1: a 4-cell λ=0 learning-rate sweep through qcompare (teacher cache on) vs four plain
TRL GKDTrainer runs, the script a user writes today. Same model, data, student, settings.

    .venv/bin/python bench/p1_lambda0_sweep.py [--steps 40]

Target: qcompare ≤ 0.6× the plain scripts' wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import MATCHED, load_toy, plain_gkd, table

LRS = [3e-4, 1e-3, 3e-3, 1e-2]
BATCH, MAX_LENGTH = 8, 64

RECIPE = """
name = "p1"
models = ["toy-qwen3"]
seeds = [0]
device = "cpu"
teacher = false

[data]
train = "toy-chat"

[[quantizers]]
name = "torchao"
bits = 4
group_size = 32

[[distillers]]
name = "gkd"
lmbda = 0.0
beta = 0.5
learning_rate = {lrs}
per_device_train_batch_size = {batch}
max_length = {max_length}
max_steps = {steps}
save_steps = 0
"""


def run_plain(steps: int, folder: Path, settings: dict) -> float:
    t0 = time.perf_counter()
    teacher, tokenizer, data = load_toy()
    for i, lr in enumerate(LRS):
        plain_gkd(teacher, tokenizer, data, folder / f"plain{i}", learning_rate=lr, lmbda=0.0, beta=0.5,
                  per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, max_steps=steps, **settings)
    return time.perf_counter() - t0


def run_qcompare(steps: int, folder: Path) -> tuple[float, list[dict]]:
    from qcompare.recipe import load_recipe
    from qcompare.runner import Runner
    from qcompare.store import RunStore

    path = folder / "p1.toml"
    path.write_text(RECIPE.format(lrs=json.dumps(LRS), batch=BATCH, max_length=MAX_LENGTH, steps=steps))
    t0 = time.perf_counter()
    recipe = load_recipe(path)
    records = Runner(recipe, RunStore(folder / "run")).run()
    return time.perf_counter() - t0, records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm-up: first-use imports and compilation would otherwise land on whichever runs first
        teacher, tokenizer, data = load_toy()
        plain_gkd(teacher, tokenizer, data, tmp / "warmup", lmbda=0.0, per_device_train_batch_size=BATCH,
                  max_length=MAX_LENGTH, max_steps=2, **MATCHED)
        plain = run_plain(args.steps, tmp, MATCHED)
        ours, records = run_qcompare(args.steps, tmp)
        plain_defaults = run_plain(args.steps, tmp, {})
        failed = [r.get("error") for r in records if r["status"] != "done"]
        if failed:
            raise SystemExit(f"qcompare cells failed: {failed}")
        cache = sum(p.stat().st_size for p in (tmp / "run" / "shared").rglob("*.safetensors"))
    rows = []
    for r in sorted(records, key=lambda r: r["settings"]["distiller"]["params"]["learning_rate"]):
        c = r["cost"]
        rows.append((r["settings"]["distiller"]["params"]["learning_rate"], c["teacher_forwards"],
                     c["teacher_cached_tokens"], f"{c['distill_seconds']:.1f}", f"{c['total_seconds']:.1f}"))
    print(f"P1: 4-cell lambda=0 learning-rate sweep, {args.steps} steps x batch {BATCH}, toy-qwen3, one core\n")
    table(rows, ("learning_rate", "teacher_forwards", "cached_tokens", "distill_s", "cell_s"))
    print(f"\nteacher cache on disk: {cache / 1e6:.2f} MB")
    table([("plain TRL GKDTrainer x4, qcompare's settings", f"{plain:.1f}"),
           ("plain TRL GKDTrainer x4, TRL defaults (grad. checkpointing)", f"{plain_defaults:.1f}"),
           ("qcompare run (teacher cache)", f"{ours:.1f}")], ("", "wall_s"))
    print(f"\nratio qcompare / plain, same settings = {ours / plain:.2f}  (target <= 0.6)")
    print(f"ratio qcompare / plain, TRL defaults  = {ours / plain_defaults:.2f}")


if __name__ == "__main__":
    main()
