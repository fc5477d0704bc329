"""P3: peak memory (RSS) of a LoRA-QAT GKD cell through qcompare's own pipeline
(``CellPipeline.build``: prepare -> distill -> convert) vs the two-copy layout, on a random
Qwen3 of ~76M parameters (fp32: weights dominate), each layout in its own subprocess.

    .venv/bin/python bench/p3_lora_memory.py [--steps 3]

Layouts (all through the runner, the same recipe, only the copy and teacher switches differ):
  two-copy           the runner deep-copies the teacher, the distiller keeps a separate teacher
                     (torchao's shares_teacher_weights off, shared_teacher = false)
  runner deep copy   the runner deep-copies, the distiller then points the student's weights
                     at the teacher's (the copy existed for a while: the old runner)
  qcompare           the runner builds the student over the teacher's memory (LoRA + torchao:
                     weight_sharing_copy), so two copies never exist
Target: qcompare <= 0.6x two-copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = ("two-copy", "runner deep copy", "qcompare")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) * 1024


RECIPE = """
name = "p3"
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
lora_r = 8
lora_alpha = 16
max_steps = {steps}
per_device_train_batch_size = 2
max_length = 64
save_steps = 0
gradient_checkpointing = {checkpointing}
teacher_cache = false
shared_teacher = {shared}
"""


def child(layout: str, steps: int, checkpointing: bool) -> dict:
    import common  # noqa: F401 - one thread, offline
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore
    from qcompare_plugins.torchao_quantizer import TorchaoQuantizer

    TorchaoQuantizer.shares_teacher_weights = layout == "qcompare"
    convert, seen = TorchaoQuantizer.convert, {}

    def measured_convert(self, student, params, context):  # the peak of prepare + training alone
        seen["train_peak"] = rss_bytes()
        return convert(self, student, params, context)

    TorchaoQuantizer.convert = measured_convert
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p3.toml"
        path.write_text(RECIPE.format(steps=steps, checkpointing=str(checkpointing).lower(),
                                      shared=str(layout != "two-copy").lower()))
        recipe = load_recipe(path)
        store = RunStore(Path(tmp) / "run")
        store.init(recipe.text)
        runner = Runner(recipe, store)
        [(cell, _)] = runner.plan()
        # warm-up cell on the 180k-parameter toy teacher: the first step imports and compiles
        # what torchao/TRL need (~200 MB of code), the same in every layout
        runner.pipeline(cell, store.cell_dir(cell.id)).build()
        baseline = current_rss_bytes()
        toy, tokenizer = runner.inputs.teacher(cell.model)
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048,
                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                             tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        teacher = Qwen3ForCausalLM(config).eval()
        n_params = sum(p.numel() for p in teacher.parameters())
        runner.inputs._models = {cell.model: (teacher, tokenizer)}  # the random model stands in for the toy one
        del toy
        pipeline = runner.pipeline(cell, store.cell_dir(cell.id))
        _, log = pipeline.build()
    return {"layout": layout, "peak": rss_bytes(), "train_peak": seen["train_peak"], "baseline": baseline,
            "params": n_params, "student_weights": pipeline.cost["student_weights"],
            "teacher_layout": pipeline.cost["teacher_layout"], "loss": log[-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=LAYOUTS)
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc as is (it keeps freed fake-quant temporaries in its heap)")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every layer's fake-quantized weight for backward (one more weight copy)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, not args.no_checkpointing)))
        return
    from common import table

    results = {}
    for layout in LAYOUTS:
        flags = ["--no-checkpointing"] if args.no_checkpointing else []
        env = dict(os.environ)
        if not args.malloc_default:
            # big blocks straight from mmap, so RSS follows the live tensors rather than what
            # glibc's heap kept from freed temporaries (~250 MB here, in every layout)
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        out = subprocess.run([sys.executable, __file__, "--child", layout, "--steps", str(args.steps), *flags],
                             capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{layout} failed:\n{out.stderr[-3000:]}")
        results[layout] = json.loads(lines[-1][len("RESULT "):])
    ref = results["two-copy"]
    print(f"P3: LoRA-QAT GKD cell through CellPipeline.build (r=8, int4 g32, lambda=0, {args.steps} steps, "
          f"convert included), random Qwen3 with "
          f"{ref['params'] / 1e6:.0f}M parameters ({ref['params'] * 4 / 1e6:.0f} MB fp32), gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, malloc {'default' if args.malloc_default else 'mmap >= 64 KiB'}, "
          "peak RSS per subprocess\n")
    rows = []
    above = lambda r, key="peak": r[key] - r["baseline"]  # noqa: E731
    for layout, r in results.items():
        rows.append((layout, r["student_weights"], r["teacher_layout"], f"{r['peak'] / 1e6:.0f}",
                     f"{above(r) / 1e6:.0f}",
                     f"{r['peak'] / ref['peak']:.2f}", f"{above(r) / above(ref):.2f}",
                     f"{above(r, 'train_peak') / above(ref, 'train_peak'):.2f}",
                     f"{r['loss']:.6f}"))
    table(rows, ("layout", "runner copy", "teacher", "peak_MB", "above_base_MB", "ratio", "ratio_above_base",
                 "before_convert", "last_loss"))
    print("\n'above base' subtracts the RSS after imports, data loading and a warm-up cell on the toy model "
          "(code torch/TRL load on first use; the same in every layout); 'before_convert' is that ratio for the "
          "peak of prepare + training alone. Target <= 0.6.")


if __name__ == "__main__":
    main()
