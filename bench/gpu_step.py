"""GPU: one GKD step of a random-weight model with Qwen3-4B's shapes at λ=0 and λ=1, through
qcompare's gkd distiller and torchao int4 QAT student; prints tokens/s and the fraction of the
device's bf16 peak.

    .venv/bin/python bench/gpu_step.py                          # on a CUDA machine
    .venv/bin/python bench/gpu_step.py --shape tiny --device cpu  # the same code path, small, on CPU

Random weights: no download. The toy tokenizer frames the synthetic chats (prompt and answer
lengths are exact: one word, one token); the model's vocabulary is Qwen3's, so the logits and
the divergence have their real size. FLOPs are the cost meter's model FLOPs (6·N per trained
token, 2·N per teacher or rollout token; attention left out), so the fraction of peak is an MFU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback  # noqa: E402

# Qwen/Qwen3-4B-Instruct-2507's config.json, the fields that set the work
SHAPES = {
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=40960, rope_theta=5_000_000.0, rms_norm_eps=1e-6),
    # the real vocabulary on a tiny body: where the loss's [batch, length, vocab] tensors dominate memory
    "tiny-vocab": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=4096, tie_word_embeddings=True,
                 max_position_embeddings=4096),
}
# dense bf16 tensor-core peaks (vendor datasheets, no sparsity)
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0}


def peak_tflops(device: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "given"
    if device != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value, name
    return None, name


class Snapshots(TrainerCallback):
    """The cost meter's totals and the clock at the end of every step."""

    def __init__(self, meter, device: str):
        self.meter, self.device, self.rows = meter, device, []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.rows:
            self.rows.append(self._now())

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append(self._now())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_start = self._now()[0]

    def on_optimizer_step(self, args, state, control, **kwargs):
        # the optimizer's seconds, kept per step like the meter's totals (read as a difference)
        self.meter.totals["optimizer_seconds"] = (self.meter.totals.get("optimizer_seconds", 0.0)
                                                 + self._now()[0] - self._optimizer_start)

    def _now(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), dict(self.meter.totals)


def rounding_seconds(model, device: str) -> float:
    """Seconds to fake-quantize every weight once (what each forward of the student does first)."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    pairs = [(q, getattr(parent, "weight")) for parent in model.modules() for name, q in parent.named_children()
             if name == "weight_fake_quantizer" and isinstance(q, FakeQuantizerBase)]
    with torch.no_grad():
        for _ in range(2):  # the first pass warms up (and compiles, with compile_rounding)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for q, w in pairs:
                q(w)
            if device == "cuda":
                torch.cuda.synchronize()
    return time.perf_counter() - start


def chats(tokenizer, n: int, prompt: int, answer: int, seed: int) -> list[dict]:
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower()]
    g = torch.Generator().manual_seed(seed)

    def text(k):
        return " ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist())

    return [{"messages": [{"role": "user", "content": text(prompt)}, {"role": "assistant", "content": text(answer)}]}
            for _ in range(n)]


def one_setting(lmbda: float, args, teacher, tokenizer, folder: Path) -> dict:
    from datasets import Dataset

    from qcompare.sdk.api import CellContext
    from qcompare_plugins.distillers.common import check_data, compiled_rounding, fp32_master_weights, run_training
    from qcompare_plugins.distillers.cost import CostMeter, count_params
    from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams
    from qcompare_plugins.torchao_quantizer import TorchaoQuantizer

    steps = args.warmup + args.steps
    if args.device == "cuda":  # the previous setting's tensors are gone before this one's peak is read
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = GKDParams(lmbda=lmbda, beta=0.5, learning_rate=1e-6, per_device_train_batch_size=args.batch,
                       max_length=args.prompt + args.answer + 32, max_new_tokens=args.answer, max_steps=steps,
                       save_steps=0, teacher_cache=False, lora_r=args.lora_r,
                       gradient_checkpointing=args.gradient_checkpointing, loss_kernel=args.loss_kernel,
                       rollouts=args.rollouts, compile_rounding=args.compile_rounding)
    context = CellContext(cell_dir=folder, seed=0, device=args.device, tokenizer=tokenizer, teacher=teacher)
    quantizer = TorchaoQuantizer()
    student = quantizer.prepare(copy.deepcopy(teacher), TorchaoQuantizer.Params(bits=4, group_size=128), context)
    data = check_data(Dataset.from_list(chats(tokenizer, args.batch * steps, args.prompt, args.answer, 0)), "gkd")
    meter = CostMeter(args.device)
    snaps = Snapshots(meter, args.device)
    # as GKDDistiller.distill trains a cell: fp32 master weights for full fine-tuning, rounding compiled if asked
    with fp32_master_weights(student, params), compiled_rounding(student, params):
        trainer = GKDDistiller().make_trainer(teacher, student, tokenizer, data, params, context, meter,
                                              callbacks=[snaps])
        run_training("gkd", trainer, meter, teacher, params, context)
        rounding = rounding_seconds(trainer.model, args.device)
    (t0, a), (t1, b) = snaps.rows[args.warmup], snaps.rows[-1]
    d = {k: b[k] - a[k] for k in b}
    n = count_params(teacher)  # LoRA adds a few; the base is what the FLOPs are
    flops = 6 * n * d["student_tokens"] + 2 * n * (d["teacher_tokens"] + d["student_rollout_tokens"])
    seconds = t1 - t0
    out = {
        "lambda": lmbda, "batch": args.batch, "steps": args.steps, "seconds_per_step": seconds / args.steps,
        "student_tokens_per_s": d["student_tokens"] / seconds,
        "generated_tokens_per_s": d["tokens_generated"] / d["rollout_seconds"] if d["rollout_seconds"] else 0.0,
        "rollout_share": d["rollout_seconds"] / seconds, "teacher_share": d["teacher_forward_seconds"] / seconds,
        "tflops": flops / seconds / 1e12, "params": n,
    }
    # where the step goes: the optimizer (timed), the teacher and rollouts (metered), and one rounding of
    # every fake-quantized weight (timed after training), which each student forward repeats
    out["optimizer_share"] = d.get("optimizer_seconds", 0.0) / seconds
    out["rounding_ms_per_forward"] = 1000 * rounding
    out["rounding_share"] = out["rounding_ms_per_forward"] / 1000 / out["seconds_per_step"]
    engine = trainer.engine
    out.update(loss=trainer.loss_path, rollouts=("static" if engine else "dynamic") if lmbda > 0 else None,
               rollout_compiles=engine.compiles if engine else 0,
               rollout_compile_seconds=engine.compile_seconds if engine else 0.0,
               decode_ms_per_step=(1000 * args.batch / out["generated_tokens_per_s"]) if out["generated_tokens_per_s"] else None)
    if args.device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:  # the process's peak so far: run one λ per process to read one setting's
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    del trainer, student
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--answer", type=int, default=256, help="answer tokens (the rollout length at λ=1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full QAT fine-tuning)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--rollouts", choices=("static", "dynamic"), default="static",
                        help="on-policy rollouts from the static-shape copy, or from the training student")
    parser.add_argument("--compile-rounding", action="store_true", help="weight fake quantizers compiled")
    parser.add_argument("--loss-kernel", choices=("chunked", "full"), default="chunked",
                        help="the GKD loss: tiled from hidden states, or from full-vocabulary logits")
    parser.add_argument("--lambdas", default="0,1", help="comma-separated λ values")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from common import table  # bench/common.py: also one CPU thread and offline, as every bench

    from qcompare.engine.inputs import load_model
    from qcompare.sdk.registry import get_registry

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = Qwen3Config(**SHAPES[args.shape])
    t0 = time.perf_counter()
    with torch.device(args.device):
        teacher = Qwen3ForCausalLM(config).to(dtype).eval()
    _, tokenizer = load_model("toy-qwen3", get_registry(), "cpu")  # the toy tokenizer frames the chats
    build = time.perf_counter() - t0
    peak, where = peak_tflops(args.device, args.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, lmbda in enumerate(float(x) for x in args.lambdas.split(",")):
            rows.append(one_setting(lmbda, args, teacher, tokenizer, Path(tmp) / f"l{i}"))
    print(f"GKD step, random {args.shape} ({rows[0]['params'] / 1e6:,.1f} M parameters, built in {build:.0f} s), "
          f"int4 g128 QAT student, lora_r={args.lora_r}, batch {args.batch} x ({args.prompt} prompt + "
          f"{args.answer} answer) tokens, {args.device} ({where})\n")
    head = ("lambda", "s/step", "student tok/s", "rollout tok/s", "rollout %", "teacher %", "TFLOP/s", "of bf16 peak")
    lines = []
    for r in rows:
        frac = f"{r['tflops'] / peak:.1%}" if peak else "n/a (give --peak-tflops)"
        r["fraction_of_peak"] = r["tflops"] / peak if peak else None
        lines.append((f"{r['lambda']:g}", f"{r['seconds_per_step']:.3f}", f"{r['student_tokens_per_s']:.0f}",
                      f"{r['generated_tokens_per_s']:.0f}", f"{r['rollout_share']:.0%}", f"{r['teacher_share']:.0%}",
                      f"{r['tflops']:.1f}", frac))
    table(lines, head)
    if "peak_memory_gib" in rows[0]:
        print("\npeak GPU memory (GiB): " + ", ".join(f"λ={r['lambda']:g} {r['peak_memory_gib']:.1f}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
