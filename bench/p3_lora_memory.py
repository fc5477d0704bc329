"""P3: peak memory (RSS) of a LoRA-QAT GKD cell with the shared teacher vs the two-copy
layout, on a random Qwen3 of ~76M parameters (fp32: weights dominate), each layout in its
own subprocess.

    .venv/bin/python bench/p3_lora_memory.py [--steps 3]

Layouts:
  two-copy          teacher + a deep copy as the student (shared_teacher = false)
  shared, deepcopy  the runner's deep copy, then the distiller points the student's
                    weights at the teacher's (the copy is freed, but it existed)
  shared, no copy   the student is built over the teacher's weights from the start
                    (shared_teacher.weight_sharing_copy), so two copies never exist
Target: shared ≤ 0.6× two-copy.
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

LAYOUTS = ("two-copy", "shared, deepcopy", "shared, no copy")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) * 1024


def child(layout: str, steps: int, checkpointing: bool) -> dict:
    import copy

    import torch
    from common import load_toy
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qcompare.api import CellContext
    from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams
    from qcompare_plugins.distillers.shared_teacher import weight_sharing_copy

    toy, tokenizer, data = load_toy()
    data = data.select(range(64))
    params = dict(lmbda=0.0, lora_r=8, lora_alpha=16, max_steps=steps, per_device_train_batch_size=2,
                  max_length=64, save_steps=0, gradient_checkpointing=checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up on the 180k-parameter toy model: the first step imports and compiles what
        # torchao/TRL need (~200 MB of code), the same in every layout
        context = CellContext(cell_dir=Path(tmp), seed=0, device="cpu", tokenizer=tokenizer)
        GKDDistiller().distill(toy, copy.deepcopy(toy), tokenizer, data, GKDParams(**params), context)
    baseline = current_rss_bytes()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    teacher = Qwen3ForCausalLM(config).eval()
    n_params = sum(p.numel() for p in teacher.parameters())
    student = weight_sharing_copy(teacher) if layout == "shared, no copy" else copy.deepcopy(teacher)
    quantize_(student, QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), step="prepare"))
    params = GKDParams(**params, shared_teacher=layout != "two-copy")
    with tempfile.TemporaryDirectory() as tmp:
        context = CellContext(cell_dir=Path(tmp), seed=0, device="cpu", tokenizer=tokenizer)
        result = GKDDistiller().distill(teacher, student, tokenizer, data, params, context)
    return {"layout": layout, "peak": rss_bytes(), "baseline": baseline, "params": n_params,
            "teacher_layout": result.cost["teacher_layout"], "loss": result.log[-1]["loss"]}


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
    print(f"P3: LoRA-QAT GKD cell (r=8, int4 g32, lambda=0, {args.steps} steps), random Qwen3 with "
          f"{ref['params'] / 1e6:.0f}M parameters ({ref['params'] * 4 / 1e6:.0f} MB fp32), gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, malloc {'default' if args.malloc_default else 'mmap >= 64 KiB'}, "
          "peak RSS per subprocess\n")
    rows = []
    for layout, r in results.items():
        rows.append((layout, r["teacher_layout"], f"{r['peak'] / 1e6:.0f}", f"{(r['peak'] - r['baseline']) / 1e6:.0f}",
                     f"{r['peak'] / ref['peak']:.2f}", f"{(r['peak'] - r['baseline']) / (ref['peak'] - ref['baseline']):.2f}",
                     f"{r['loss']:.6f}"))
    table(rows, ("layout", "teacher", "peak_MB", "above_base_MB", "ratio", "ratio_above_base", "last_loss"))
    print("\n'above base' subtracts the RSS after imports, data loading and a warm-up cell on the toy model "
          "(code torch/TRL load on first use; the same in every layout). Target <= 0.6.")


if __name__ == "__main__":
    main()
