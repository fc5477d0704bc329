"""P2: step time of a λ=1 (on-policy) GKD cell through qcompare's gkd distiller vs plain TRL
GKDTrainer, same student, data and settings; runs alternate to spread machine drift.

    .venv/bin/python bench/p2_step_overhead.py [--steps 30 --repeats 2]

Target: qcompare ≤ 0.7× plain: rollouts round each fake-quantized weight once per generate call
instead of once per decoded token (qcompare_plugins.distillers.rollouts), the same samples.
Rollout tokens/s are printed for both.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import MATCHED, StepTimer, load_toy, median, plain_gkd, table

from qcompare.testing import tiny_student

# a learning rate so small the student does not move: both trainers then sample the same
# rollouts (same seed), so they do the same work and only the wrappers differ
SETTINGS = dict(lmbda=1.0, beta=0.5, learning_rate=1e-9, per_device_train_batch_size=8, max_length=64,
                max_new_tokens=16, temperature=1.0)


def qcompare_steps(teacher, tokenizer, data, steps: int, folder: Path, rollouts: str = "auto") -> list[float]:
    from qcompare.sdk.api import CellContext
    from qcompare_plugins.distillers.common import check_data, run_training
    from qcompare_plugins.distillers.cost import CostMeter
    from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams

    params = GKDParams(**SETTINGS, max_steps=steps, save_steps=0, rollouts=rollouts)
    context = CellContext(cell_dir=folder, seed=0, device="cpu", tokenizer=tokenizer)
    timer, meter = StepTimer(), CostMeter("cpu")
    trainer = GKDDistiller().make_trainer(teacher, tiny_student(teacher), tokenizer, check_data(data, "gkd"), params,
                                          context, meter, callbacks=[timer])
    run_training("gkd", trainer, meter, teacher, params, context)
    name = "qcompare" if rollouts == "auto" else f"qcompare {rollouts}"
    ROLLOUTS[name][0] += meter.totals["rollout_seconds"]
    ROLLOUTS[name][1] += meter.totals["tokens_generated"]
    return timer.seconds


# seconds in generate, tokens generated; "qcompare static": rollouts from the static-shape copy
# (rollouts = "static"; the default "auto" takes it on a GPU only)
ROLLOUTS = {"plain": [0.0, 0], "qcompare": [0.0, 0], "qcompare static": [0.0, 0]}


def plain_steps(teacher, tokenizer, data, steps: int, folder: Path) -> list[float]:
    import time
    from unittest import mock

    from trl.experimental.gkd import GKDTrainer

    original = GKDTrainer.generate_on_policy_outputs

    def timed(model, inputs, generation_config):
        start = time.perf_counter()
        ids, mask, labels = original(model, inputs, generation_config)
        ROLLOUTS["plain"][0] += time.perf_counter() - start
        ROLLOUTS["plain"][1] += int(mask[:, inputs["prompts"].shape[1]:].sum())
        return ids, mask, labels

    timer = StepTimer()
    with mock.patch.object(GKDTrainer, "generate_on_policy_outputs", staticmethod(timed)):
        plain_gkd(teacher, tokenizer, data, folder, callbacks=[timer], max_steps=steps, **SETTINGS, **MATCHED)
    return timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    teacher, tokenizer, data = load_toy()
    times = {"plain": [], "qcompare": [], "qcompare static": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # the first step of a run (lazy inits) is left out of both
            times["plain"] += plain_steps(teacher, tokenizer, data, args.steps, Path(tmp) / f"p{r}")[1:]
            times["qcompare"] += qcompare_steps(teacher, tokenizer, data, args.steps, Path(tmp) / f"q{r}")[1:]
            times["qcompare static"] += qcompare_steps(teacher, tokenizer, data, args.steps, Path(tmp) / f"s{r}",
                                                       "static")[1:]
    rows = [(k, len(v), f"{1000 * median(v):.1f}", f"{1000 * sum(v) / len(v):.1f}",
             f"{ROLLOUTS[k][1] / ROLLOUTS[k][0]:.0f}" if ROLLOUTS[k][0] else "—") for k, v in times.items()]
    print(f"P2: lambda=1 GKD step time, batch {SETTINGS['per_device_train_batch_size']}, "
          f"{SETTINGS['max_new_tokens']} new tokens, toy-qwen3, one core\n")
    table(rows, ("trainer", "steps", "median_ms", "mean_ms", "rollout_tokens_per_s"))
    ratio_median = median(times["qcompare"]) / median(times["plain"])
    ratio_mean = sum(times["qcompare"]) / sum(times["plain"])
    print(f"\nratio qcompare / plain: median {ratio_median:.2f}, mean {ratio_mean:.2f}  (target <= 0.7)")
    static = median(times["qcompare static"]) / median(times["qcompare"])
    print(f"ratio static-shape copy / the training student (CPU's default): median {static:.2f}  (on CPU nothing "
          "compiles; the copy pays on a GPU)")


if __name__ == "__main__":
    main()
