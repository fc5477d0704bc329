"""P1: a 4-cell λ=0 learning-rate sweep through qcompare vs four plain TRL GKDTrainer runs, the
script a user writes today. Same model, data, student and settings; runs one after another.

    .venv/bin/python bench/p1_lambda0_sweep.py [--steps 100]

Rows:
  plain, 1 thread        four GKDTrainer runs in a row, one thread (the qcompare rows' per-cell budget)
  plain, all cores       the same with torch using every core (what a script does by default)
  qcompare, 1 worker     `qcompare run`: cells in one process (teacher cache, chats tokenized once)
  qcompare, N workers    the same with `workers = N` (cores): N cells at once, one thread each
Ratios: the spend (qcompare, 1 worker vs plain, 1 thread: the same CPU) and the machine's wall
time (qcompare, N workers vs the faster plain row). Target: wall time <= 0.6x.

    .venv/bin/python bench/p1_lambda0_sweep.py --cache-rows [--steps 12]

The teacher cache at the study's proportions: a random-weight model shaped like Qwen3-4B in the
ratios that matter (vocabulary 60x the hidden size, >= 85% of a teacher forward in the body:
hidden 128, 32 layers, vocabulary 7,680), the same 4-cell sweep with teacher_cache = hidden,
logits and off, each in a fresh process: wall time, spend (summed cell seconds), peak memory.
Targets: hidden <= 0.85x the spend of off at <= 1.1x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
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

[executor]
name = "local"
workers = {workers}
"""


def run_plain(steps: int, folder: Path, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        teacher, tokenizer, data = load_toy()
        for i, lr in enumerate(LRS):
            plain_gkd(teacher, tokenizer, data, folder / f"plain{i}", learning_rate=lr, lmbda=0.0, beta=0.5,
                      per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, max_steps=steps, **MATCHED)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(1)


def run_qcompare(steps: int, folder: Path, workers: int) -> tuple[float, list[dict]]:
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore

    path = folder / f"p1-{workers}.toml"
    path.write_text(RECIPE.format(lrs=json.dumps(LRS), batch=BATCH, max_length=MAX_LENGTH, steps=steps, workers=workers))
    t0 = time.perf_counter()
    records = Runner(load_recipe(path), RunStore(folder / f"run{workers}")).run()
    seconds = time.perf_counter() - t0
    failed = [r.error for r in records if not r.done]
    if failed:
        raise SystemExit(f"qcompare cells failed: {failed}")
    return seconds, records


SHAPED = dict(hidden_size=128, num_hidden_layers=32, vocab_size=7680, intermediate_size=384, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32)


def shaped_model(folder: Path) -> Path:
    """The toy tokenizer on a random-weight Qwen3 shaped like Qwen3-4B's proportions (SHAPED)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from common import toy_paths

    model_dir, _ = toy_paths()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPED, max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CACHE_RUN = """
import json, resource, sys, time
from qcompare.engine.recipe import load_recipe
from qcompare.engine.runner import Runner
from qcompare.results.store import RunStore
t0 = time.perf_counter()
records = Runner(load_recipe(sys.argv[1]), RunStore(sys.argv[2])).run()
assert all(r.done for r in records), [r.error for r in records]
print(json.dumps({"wall": time.perf_counter() - t0, "spend": sum(r.cost["total_seconds"] for r in records),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "forwards": sum(r.cost["teacher_forwards"] for r in records),
                  "flops_spent": sum(r.cost["flops_spent"] for r in records),
                  "cache_bytes": max(r.cost.get("teacher_cache_bytes", 0) for r in records),
                  "teacher_share": sum(r.cost["teacher_forward_seconds"] for r in records)
                  / sum(r.cost["train_seconds"] for r in records),
                  "cache": records[-1].cost.get("teacher_cache", "")}))
"""


def cache_rows(steps: int) -> None:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = shaped_model(tmp / "shaped")
        results = {}
        for mode in ("off", "hidden", "logits"):
            recipe = tmp / f"cache-{mode}.toml"
            recipe.write_text(RECIPE.format(lrs=json.dumps(LRS), batch=BATCH, max_length=MAX_LENGTH, steps=steps,
                                            workers=1).replace('"toy-qwen3"', json.dumps(str(model)))
                              .replace("save_steps = 0", f'save_steps = 0\nteacher_cache = "{mode}"\nteacher_cache_max_gb = 20'))
            out = subprocess.run([sys.executable, "-c", CACHE_RUN, str(recipe), str(tmp / f"run-{mode}")],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"teacher_cache = {mode}: {out.stderr[-2000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    off = results["off"]
    print(f"teacher cache at Qwen3-4B's proportions ({SHAPED}), 4-cell lambda=0 sweep, {steps} steps x batch "
          f"{BATCH}, one process each\n")
    table([(mode, f"{r['wall']:.1f}", f"{r['spend']:.1f}", f"{r['spend'] / off['spend']:.2f}",
            f"{r['peak'] / 1e9:.2f}", f"{r['peak'] / off['peak']:.2f}", r["forwards"],
            f"{r['flops_spent'] / 1e12:.3f}", f"{r['cache_bytes'] / 1e6:.1f}") for mode, r in results.items()],
          ("teacher_cache", "wall_s", "spend_s", "spend/off", "peak_GB", "peak/off", "teacher_forwards",
           "TFLOP_spent", "cache_MB"))
    print(f"\nteacher forwards are {off['teacher_share']:.0%} of the training time without a cache: 4 cells can save "
          f"at most {0.75 * off['teacher_share']:.0%} of it")
    print("\ntargets: hidden spend/off <= 0.85 at peak/off <= 1.1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="qcompare's parallel row")
    parser.add_argument("--cache-rows", action="store_true", help="only the teacher-cache rows at Qwen3-4B's proportions")
    args = parser.parse_args()
    if args.cache_rows:
        cache_rows(args.steps)
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm-up: first-use imports and compilation would otherwise land on whichever runs first
        teacher, tokenizer, data = load_toy()
        plain_gkd(teacher, tokenizer, data, tmp / "warmup", lmbda=0.0, per_device_train_batch_size=BATCH,
                  max_length=MAX_LENGTH, max_steps=2, **MATCHED)
        plain1 = run_plain(args.steps, tmp, 1)
        serial, records = run_qcompare(args.steps, tmp, 1)
        plain_all = run_plain(args.steps, tmp, cores)
        parallel, _ = run_qcompare(args.steps, tmp, args.workers)
        cache = sum(p.stat().st_size for p in (tmp / "run1" / "shared").rglob("*.safetensors"))
    rows = []
    for r in sorted(records, key=lambda r: r.settings.distiller.params["learning_rate"]):
        c = r.cost
        rows.append((r.settings.distiller.params["learning_rate"], c["teacher_forwards"],
                     c["teacher_cached_tokens"], f"{c['distill_seconds']:.2f}", f"{c['total_seconds']:.2f}"))
    print(f"P1: 4-cell lambda=0 learning-rate sweep, {args.steps} steps x batch {BATCH}, toy-qwen3, {cores} cores\n")
    print("qcompare, 1 worker, per cell:")
    table(rows, ("learning_rate", "teacher_forwards", "cached_tokens", "distill_s", "cell_s"))
    print(f"teacher cache on disk: {cache / 1e6:.2f} MB\n")
    table([("plain TRL GKDTrainer x4, 1 thread", f"{plain1:.2f}"),
           (f"plain TRL GKDTrainer x4, {cores} threads", f"{plain_all:.2f}"),
           ("qcompare run, 1 worker (1 thread)", f"{serial:.2f}"),
           (f"qcompare run, {args.workers} workers (1 thread each)", f"{parallel:.2f}")], ("", "wall_s"))
    best_plain = min(plain1, plain_all)
    print(f"\nspend: qcompare 1 worker / plain 1 thread       = {serial / plain1:.2f}")
    print(f"wall:  qcompare {args.workers} workers / faster plain row = {parallel / best_plain:.2f}  (target <= 0.6)")


if __name__ == "__main__":
    main()
