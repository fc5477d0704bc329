"""The first GPU run, as one prepared command: what must work on CUDA, measured, in one JSON.

    python3 bench/gpu_check.py --out results.json                       # on a CUDA machine, < 8 min
    .venv/bin/python bench/gpu_check.py --tiny --device cpu --out r.json  # the same path, small, on CPU

1. The GPU step bench (bench/gpu_step.py) at Qwen3-4B's shapes, λ = 0 and λ = 1: s/step, tokens/s,
   the fraction of the device's bf16 peak, the rollout share.
2. A small recipe end to end: a random-weight model shaped like Qwen3 (bf16 on CUDA) with the toy
   tokenizer, torchao INT4 through the CUDA kernel path (``packing = "tinygemm"``), GKD λ ∈ {0, 1}
   for a few steps, the toy lm-eval tasks, each cell's model saved and reloaded (the runner's
   reload check). Cell status, metrics, checks and cost go into the JSON.
3. Rollouts on that model: the dynamic KV cache against the static one (compiled by transformers on
   a GPU), tokens/s and whether greedy tokens agree.

A GPU machine with no package registry needs the wheels bench/gpu_wheels.txt lists, fetched here by
bench/fetch_gpu_wheels.sh and installed there before this script (see docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPED = {  # Qwen3's layer shapes, fewer layers: a minute of work, the real kernels
    "cuda": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}
RECIPE = """
name = "gpu-check"
models = [{model}]
seeds = [0]
device = "{device}"
save_models = true

[data]
train = "toy-chat"
subset = 64

[[quantizers]]
name = "torchao"
bits = 4
group_size = 32
symmetric = {symmetric}
packing = "{packing}"

[[distillers]]
name = "gkd"
lmbda = [0.0, 1.0]
max_steps = {steps}
per_device_train_batch_size = 4
max_length = 64
max_new_tokens = 16
learning_rate = 1e-5

[[evaluators]]
name = "lm_eval"
tasks = ["toy_arith", "toy_gen"]
limit = {limit}
"""


def shaped_model(folder: Path, shape: dict, dtype: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from qcompare.plugins import get_registry

    toy = get_registry().models["toy-qwen3"].obj[0]
    tokenizer = AutoTokenizer.from_pretrained(toy)
    torch.manual_seed(0)
    config = Qwen3Config(**shape, vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def step_bench(args, out: Path) -> list[dict]:
    cmd = [sys.executable, str(HERE / "gpu_step.py"), "--device", args.device, "--json", str(out)]
    cmd += (["--shape", "tiny", "--batch", "2", "--prompt", "8", "--answer", "8", "--steps", "2"] if args.tiny
            else ["--shape", "qwen3-4b", "--steps", "3"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return [{"error": done.stderr[-3000:]}]
    return json.loads(out.read_text())


def rollouts(args, model_dir: Path) -> dict:
    """Batched sampling from the shaped model: transformers' dynamic KV cache against its static
    cache (which transformers compiles, CUDA graphs included, on a GPU) — tokens/s of each and
    whether the greedy tokens agree (the exactness a faster rollout path must keep)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = args.device
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device).eval()
    prompts = tokenizer([f"<|user|> what is {a} plus {b} <|end|> <|assistant|>" for a in range(4) for b in range(4)],
                        return_tensors="pt", padding=True).to(device)
    new = 8 if args.tiny else 64
    out = {}
    for name, extra in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, **extra)
        try:
            first = model.generate(**prompts, generation_config=config)  # compiles, for the static cache
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                model.generate(**prompts, generation_config=config)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / 3
            out[name] = {"tokens_per_s": prompts["input_ids"].shape[0] * new / seconds, "tokens": first.tolist()}
        except Exception as e:  # noqa: BLE001 - a path that fails is a result too
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    same = all("tokens" in v for v in out.values()) and out["dynamic"]["tokens"] == out["static"]["tokens"]
    for v in out.values():
        v.pop("tokens", None)
    return {**out, "greedy_tokens_identical": same}


def end_to_end(args, folder: Path) -> dict:
    cuda = args.device == "cuda"
    model = shaped_model(folder / "model", SHAPED["tiny" if args.tiny else "cuda"], "bfloat16" if cuda else "float32")
    recipe = folder / "gpu-check.toml"
    recipe.write_text(RECIPE.format(model=json.dumps(str(model)), device=args.device, steps=2 if args.tiny else 10,
                                    limit=6 if args.tiny else 50, packing="tinygemm" if cuda else "unpacked",
                                    symmetric="false" if cuda else "true"))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qcompare", "run", str(recipe), "-o", str(folder / "run")],
                          capture_output=True, text=True)
    cells = []
    for path in sorted((folder / "run").glob("cells/*/result.json")):
        r = json.loads(path.read_text())
        cells.append({k: r.get(k) for k in ("label", "status", "error", "metrics", "checks", "size", "save_error")}
                     | {"cost": {k: v for k, v in (r.get("cost") or {}).items() if not isinstance(v, (dict, list))}})
    return {"exit_code": done.returncode, "seconds": time.perf_counter() - start, "cells": cells,
            "output_tail": (done.stdout + done.stderr)[-3000:], "rollouts": rollouts(args, model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": args.device, "tiny": args.tiny, "python": platform.python_version(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result["step_bench"] = step_bench(args, Path(tmp) / "steps.json")
        result["end_to_end"] = end_to_end(args, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(result, indent=2, default=str))
    cells = result["end_to_end"]["cells"]
    print(f"gpu_check on {result['gpu'] or args.device}: {len(result['step_bench'])} step-bench rows, "
          f"{sum(c['status'] == 'done' for c in cells)}/{len(cells)} cells done, {result['seconds']:.0f} s → {args.out}")
    sys.exit(0 if cells and all(c["status"] == "done" for c in cells) and "error" not in result["step_bench"][0] else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
