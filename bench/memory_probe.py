"""GPU: measure the two per-token terms of ``qcompare.engine.memory`` on a random-weight model with
Qwen3-4B's shapes (a few layers): the activations one decoder layer keeps for backward per token
(bf16 weights; fp32 master weights under bf16 autocast; with gradient checkpointing) and the
live fp32 [tokens, vocab] tensors of TRL's generalized JSD at its peak (forward and backward).

    python bench/memory_probe.py            # needs torch + transformers only; prints JSON

The figures set ``ACTIVATION_ELEMENTS``' extra terms and ``JSD_LOSS_TENSORS``; the probe prints the
formula's value beside each measurement.
"""

from __future__ import annotations

import json
import math
import sys

import torch
from transformers import Qwen3Config, Qwen3Model

sys.path.insert(0, ".")
from qcompare.engine.memory import Shapes, layer_activation_elements  # noqa: E402

SHAPE = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
LAYERS, BATCH, SEQ = 4, 8, 384
GIB = 2**30


def activations(weights_dtype, autocast: bool, checkpointing: bool) -> float:
    """Bytes kept after the forward of the layers, per token per layer."""
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(num_hidden_layers=LAYERS, **SHAPE)).to("cuda", weights_dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, : SEQ // 4] = 0  # one padded row, as a real batch has: the mask is kept
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    kept = torch.cuda.memory_allocated() - before
    out.float().sum().backward()
    del model, out
    torch.cuda.empty_cache()
    return kept / (BATCH * SEQ * LAYERS)


def jsd_peak(beta: float = 0.5) -> float:
    """Peak of TRL 1.16's generalized_jsd_loss (fp32 inputs), forward and backward, in fp32 [B, T, V] tensors."""
    b, t, v = 4, SEQ, SHAPE["vocab_size"]
    student = torch.randn(b, t, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(b, t, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (b, t), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s, te = student.float(), teacher.float()
    s_lp, t_lp = torch.log_softmax(s, -1), torch.log_softmax(te, -1)
    beta_t = torch.tensor(beta, dtype=s_lp.dtype)
    mix = torch.logsumexp(torch.stack([s_lp + torch.log(1 - beta_t), t_lp + torch.log(beta_t)]), dim=0)
    kl_t = torch.nn.functional.kl_div(mix, t_lp, reduction="none", log_target=True)
    kl_s = torch.nn.functional.kl_div(mix, s_lp, reduction="none", log_target=True)
    jsd = beta_t * kl_t + (1 - beta_t) * kl_s
    jsd = jsd[labels != -100].sum() / (labels != -100).sum()
    del s, te, s_lp, t_lp, mix, kl_t, kl_s
    jsd.backward()
    return (torch.cuda.max_memory_allocated() - base) / (4 * b * t * v)


def cross_entropy_peak() -> float:
    """Peak of transformers' causal-LM loss (logits upcast, cross-entropy), forward and backward, in fp32 [B, T, V]."""
    b, t, v = 4, SEQ, SHAPE["vocab_size"]
    logits = torch.randn(b, t, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (b * t,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.nn.functional.cross_entropy(logits.float().view(-1, v), labels).backward()
    return (torch.cuda.max_memory_allocated() - base) / (4 * b * t * v)


def step(lora: bool, batch: int = 4) -> dict:
    """Peak of two whole GKD-like steps (λ = 0, β = 0.5) of the 36-layer model: full fine-tuning on fp32
    masters under autocast, or LoRA r = 16 over the teacher's own bf16 weights; next to the estimate,
    less its rounded weights (no fake quantizer here: plain Linear layers)."""
    from types import SimpleNamespace

    from transformers import Qwen3ForCausalLM

    from qcompare.engine.memory import cell_memory

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cfg = Qwen3Config(num_hidden_layers=36, **SHAPE)
    with torch.device("cuda"):
        teacher = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(teacher, LoraConfig(r=16, target_modules="all-linear"))
        student.train()
    else:
        student = Qwen3ForCausalLM(cfg).to("cuda", torch.float32).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, SEQ), device="cuda")
    for _ in range(2):
        with torch.no_grad():
            if lora:
                with student.disable_adapter():
                    t_logits = student(input_ids=ids).logits
            else:
                t_logits = teacher(input_ids=ids).logits
        with torch.autocast("cuda", torch.bfloat16):
            s_logits = student(input_ids=ids).logits
        s, te = s_logits.float(), t_logits.float()
        s_lp, t_lp = torch.log_softmax(s, -1), torch.log_softmax(te, -1)
        mix = torch.logsumexp(torch.stack([s_lp + math.log(0.5), t_lp + math.log(0.5)]), dim=0)
        kl_t = torch.nn.functional.kl_div(mix, t_lp, reduction="none", log_target=True)
        kl_s = torch.nn.functional.kl_div(mix, s_lp, reduction="none", log_target=True)
        loss = (0.5 * kl_t + 0.5 * kl_s).sum(-1).mean()
        del s, te, s_lp, t_lp, mix, kl_t, kl_s, s_logits, t_logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - base
    params = SimpleNamespace(per_device_train_batch_size=batch, max_length=SEQ, lora_r=16 if lora else 0,
                             gradient_checkpointing=False, lmbda=0.0)
    n = sum(p.numel() for p in teacher.parameters())
    mem = cell_memory(Shapes(n, SHAPE["hidden_size"], 36, SHAPE["vocab_size"], SHAPE["intermediate_size"],
                             SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"], True),
                      params, shares_weights=lora)
    del teacher, student, opt, loss
    torch.cuda.empty_cache()
    return {"measured_gib": peak / GIB, "estimate_gib": (mem.peak - mem.parts["rounded weights"]) / GIB,
            "estimate_before_overhead_gib": (sum(mem.parts.values()) - mem.parts["rounded weights"]) / GIB}


def main():
    shapes = Shapes(parameters=0, hidden=SHAPE["hidden_size"], layers=LAYERS, vocab=SHAPE["vocab_size"],
                    intermediate=SHAPE["intermediate_size"], heads=SHAPE["num_attention_heads"],
                    kv_heads=SHAPE["num_key_value_heads"], head_dim=SHAPE["head_dim"], tied=True)
    out = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "formula_elements_per_token_layer": layer_activation_elements(shapes),
        "bf16_bytes_per_token_layer": activations(torch.bfloat16, False, False),
        "fp32_master_autocast_bytes_per_token_layer": activations(torch.float32, True, False),
        "bf16_checkpointing_bytes_per_token_layer": activations(torch.bfloat16, False, True),
        "fp32_cpu_like_bytes_per_token_layer": activations(torch.float32, False, False),
        "jsd_peak_fp32_tensors": jsd_peak(),
        "cross_entropy_peak_fp32_tensors": cross_entropy_peak(),
        "step_full_fp32_masters_batch4": step(lora=False),
        "step_lora16_shared_batch4": step(lora=True),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
