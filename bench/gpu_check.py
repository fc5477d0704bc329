"""The GPU check, as one prepared command: the study's step at Qwen3-4B's shapes measured in one
table and one JSON, then a small recipe end to end.

    python3 bench/gpu_check.py --out results.json                       # on a CUDA machine, < 8 min
    .venv/bin/python bench/gpu_check.py --tiny --device cpu --out r.json  # the same path, small, on CPU

1. The step (bench/gpu_step.py's setting, in this process, one random-weight model): an int4 g128
   QAT student, full fine-tuning, batch 8 × (128 prompt + 256 answer): λ = 0 and λ = 1 s/step, their
   ratio, the fraction of the device's bf16 peak (λ = 0 also with the weight fake quantizers
   compiled); rollout ms per decode step from the static-shape copy (compiled) and from the training
   student (the old path, fewer tokens); the compile seconds.
2. Peak memory of the λ = 0 step at batch 8, 16 and 32 (32 retried with gradient checkpointing if
   it does not fit), with ``qcompare plan``'s estimate beside each.
3. The tests CPU machines skip (liger against the tiled loss, the compiled static-cache decode).
4. A small recipe end to end: a random-weight model with Qwen3's layer shapes (4 layers, bf16) and
   the toy tokenizer, torchao INT4 through the CUDA kernel path (``packing = "tinygemm"``), GKD
   λ ∈ {0, 1}, the toy lm-eval tasks, every model saved and reloaded (the runner's checks).

The JSON is written after every part, so a run stopped by its time limit keeps what it measured.
A GPU machine with no package registry needs the wheels bench/gpu_wheels.txt lists and the
project's own wheel (its entry points register the plugins), fetched here by
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

    from qcompare.sdk.registry import get_registry

    toy = get_registry().models["toy-qwen3"].obj[0]
    tokenizer = AutoTokenizer.from_pretrained(toy)
    torch.manual_seed(0)
    config = Qwen3Config(**shape, vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


def step_args(args, **over) -> argparse.Namespace:
    """bench/gpu_step.py's arguments for one setting."""
    base = dict(shape="tiny" if args.tiny else "qwen3-4b", device=args.device, batch=2 if args.tiny else 8,
                prompt=8 if args.tiny else 128, answer=8 if args.tiny else 256, steps=1 if args.tiny else 2,
                warmup=1, lora_r=0, gradient_checkpointing=False, loss_kernel="chunked", rollouts="static",
                compile_rounding=False)
    return argparse.Namespace(**{**base, **over})


def guarded(fn, *a, **k) -> dict:
    """A part that fails is a result too: its error, in one line."""
    try:
        return fn(*a, **k)
    except Exception as e:  # noqa: BLE001
        if "out of memory" in str(e).lower():
            import torch

            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}


def estimated_peak(shape: dict, a: argparse.Namespace) -> float:
    """``qcompare plan``'s estimate for this setting, in GiB (qcompare.engine.memory)."""
    from qcompare.engine.memory import Shapes, cell_memory
    from qcompare_plugins.distillers.gkd import GKDParams

    config = {**shape, "model_type": "qwen3"}
    n = (shape["vocab_size"] * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)
         + shape["num_hidden_layers"] * (shape["hidden_size"] * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * shape["head_dim"]
                                         + 3 * shape["hidden_size"] * shape["intermediate_size"]))
    params = GKDParams(lmbda=0.0, per_device_train_batch_size=a.batch, max_length=a.prompt + a.answer,
                       gradient_checkpointing=a.gradient_checkpointing)
    return cell_memory(Shapes.from_config(config, n), params, device=a.device).peak / 2**30


def the_step(args, result: dict, save) -> None:
    """Part 1 and 2 on one random-weight teacher."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(HERE))
    from gpu_step import SHAPES, one_setting, peak_tflops

    from qcompare.engine.inputs import load_model
    from qcompare.sdk.registry import get_registry

    shape = SHAPES["tiny" if args.tiny else "qwen3-4b"]
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(args.device):
        teacher = Qwen3ForCausalLM(Qwen3Config(**shape)).to(torch.bfloat16 if args.device == "cuda" else torch.float32)
    teacher.eval()
    _, tokenizer = load_model("toy-qwen3", get_registry(), "cpu")
    result["model_build_seconds"] = time.perf_counter() - start
    peak, result["peak_source"] = peak_tflops(args.device, None)
    result["bf16_peak_tflops"] = peak
    rows = result.setdefault("step", {})
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("lambda0", 0.0, {}), ("lambda0_compiled_rounding", 0.0, {"compile_rounding": True}),
                    ("lambda1", 1.0, {}),
                    ("lambda1_dynamic", 1.0, {"rollouts": "dynamic", "answer": 8 if args.tiny else 32, "steps": 1})]
        for name, lmbda, over in settings:
            rows[name] = row = guarded(one_setting, lmbda, step_args(args, **over), teacher, tokenizer, Path(tmp) / name)
            if "tflops" in row:
                row["fraction_of_peak"] = row["tflops"] / peak if peak else None
            save()
        peaks = result.setdefault("peaks", {})
        for batch in ((2, 4, 8) if args.tiny else (8, 16, 32)):
            a = step_args(args, batch=batch, steps=1)
            row = guarded(one_setting, 0.0, a, teacher, tokenizer, Path(tmp) / f"b{batch}")
            if "error" in row and "memory" in row["error"].lower():
                a = step_args(args, batch=batch, steps=1, gradient_checkpointing=True)
                row = {"without_checkpointing": row["error"],
                       **guarded(one_setting, 0.0, a, teacher, tokenizer, Path(tmp) / f"b{batch}gc")}
            if "tflops" in row:
                row["fraction_of_peak"] = row["tflops"] / peak if peak else None
            row["gradient_checkpointing"] = a.gradient_checkpointing
            row["estimated_gib"] = guarded(estimated_peak, shape, a)
            peaks[str(batch)] = row
            save()
    del teacher


def table(result: dict) -> str:
    """The one table the run prints."""
    step, peaks, lines = result.get("step", {}), result.get("peaks", {}), []

    def get(row, key, fmt):
        return fmt.format(row[key]) if isinstance(row, dict) and row.get(key) is not None else "—"

    off, on, dyn = step.get("lambda0", {}), step.get("lambda1", {}), step.get("lambda1_dynamic", {})
    ratio = (on["seconds_per_step"] / off["seconds_per_step"]
             if "seconds_per_step" in on and "seconds_per_step" in off else None)
    b = off.get("batch", "?")
    lines += [(f"λ=0 step (batch {b})", get(off, "seconds_per_step", "{:.3f} s"), get(off, "fraction_of_peak", "{:.1%} of bf16 peak")),
              ("λ=0 step: rounding / teacher / optimizer", " / ".join(get(off, k, "{:.0%}") for k in
                                                                    ("rounding_share", "teacher_share", "optimizer_share")),
               f"rounding {get(off, 'rounding_ms_per_forward', '{:.1f}')} ms per student forward"),
              ("λ=0 step, rounding compiled", get(step.get("lambda0_compiled_rounding"), "seconds_per_step", "{:.3f} s"),
               get(step.get("lambda0_compiled_rounding"), "fraction_of_peak", "{:.1%} of bf16 peak")),
              (f"λ=1 step (batch {b})", get(on, "seconds_per_step", "{:.3f} s"), f"{ratio:.2f}× λ=0" if ratio else "—"),
              ("rollout, static copy (compiled)", get(on, "decode_ms_per_step", "{:.2f} ms/step"),
               f"{on.get('rollout_compiles', '—')} shapes, {get(on, 'rollout_compile_seconds', '{:.0f} s')} compiling"),
              ("rollout, training student (dynamic)", get(dyn, "decode_ms_per_step", "{:.2f} ms/step"), "the old path (training student)"),
              ("loss", str(off.get("loss", "—")), "")]
    for batch, row in peaks.items():
        label = f"peak, λ=0 batch {batch}" + (" (checkpointing)" if row.get("gradient_checkpointing") else "")
        lines.append((label, get(row, "peak_memory_gib", "{:.1f} GiB") if "peak_memory_gib" in row else get(row, "peak_rss_gib", "{:.1f} GiB (RSS)"),
                      f"estimate {get(row, 'estimated_gib', '{:.1f}')} GiB; {get(row, 'fraction_of_peak', '{:.1%} of peak')}"
                      + (f"; {row['error']}" if "error" in row else "")))
    tests = result.get("cuda_tests") or {}
    lines.append(("CUDA-only tests (liger, compiled decode)", tests.get("summary") or tests.get("skipped")
                  or tests.get("error", "—"), ""))
    for name, row in step.items():
        if "error" in row:
            lines.append((name, "failed", row["error"]))
    widths = [max(len(str(r[i])) for r in lines) for i in range(3)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in lines)


def cuda_tests(args) -> dict:
    """The tests CPU machines skip: liger's fused linear JSD against the tiled loss, and the compiled
    static-cache decode of the rollout copy (greedy tokens equal to eager in fp32, no recompile on refresh)."""
    if args.device != "cuda":
        return {"skipped": "no CUDA"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/plugins/test_chunked_loss.py",
                           "tests/plugins/test_static_rollouts.py", "-k", "liger or cuda"], capture_output=True, text=True,
                          timeout=300, cwd=HERE.parent)
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    return {"exit_code": done.returncode, "summary": lines[-1] if lines else "", "output_tail": done.stdout[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget", type=float, default=420, help="seconds after which the end-to-end part is skipped")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": args.device, "tiny": args.tiny, "python": platform.python_version(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    start = time.perf_counter()

    def save():
        result["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(result, indent=2, default=str))

    guarded(the_step, args, result, save)
    save()
    result["cuda_tests"] = guarded(cuda_tests, args)
    save()
    if not args.skip_end_to_end and time.perf_counter() - start < args.budget:
        with tempfile.TemporaryDirectory() as tmp:
            result["end_to_end"] = guarded(end_to_end, args, Path(tmp))
    save()
    print(f"gpu_check on {result['gpu'] or args.device} ({result['torch']}), {result['seconds']:.0f} s → {args.out}\n")
    print(table(result))
    cells = (result.get("end_to_end") or {}).get("cells", [])
    if cells:
        print(f"\nend to end: {sum(c['status'] == 'done' for c in cells)}/{len(cells)} cells done")
    failed = [k for k, v in result.get("step", {}).items() if "error" in v]
    sys.exit(1 if failed or not result.get("step") or (cells and any(c["status"] != "done" for c in cells)) else 0)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
