"""The distillation losses without the vocabulary: from the final hidden states, the output heads
applied a tile of tokens × a tile of the vocabulary at a time, recomputed in backward.

A full-vocabulary loss holds several fp32 [batch, length, vocab] tensors: at Qwen3-4B's vocabulary
(151,936) and batch 8 × 384 tokens each is 1.7 GiB, and the generalized JSD keeps five or more
for backward. TRL 1.16 ships the tiled computation this needs (``trl.kernels.chunked_divergence``:
Triton kernels on CUDA, torch tiles elsewhere; its ``DistillationTrainer`` and, for the
cross-entropy, ``SFTTrainer``'s fused LM head use it). This module feeds it from qcompare's GKD
trainer: the student's backbone output at the answer positions, the teacher's (from a forward, the
run's hidden-state cache, or the shared LoRA base), and both heads' weights.

The kernel reads the head's ``weight`` and ``bias`` directly, so it serves only a head that is a
plain ``nn.Linear`` (the default: every quantizer skips ``lm_head``); a fake-quantized head or one
with a LoRA adapter computes something else in its forward and takes the full-vocabulary path
(``plain_head`` says why).
"""

from __future__ import annotations

import torch
from torch import nn


def plain_head(model) -> str | None:
    """None when ``model``'s output head computes exactly ``x @ weight.T + bias`` (what the tiled
    kernel assumes), else why not."""
    head = model.get_output_embeddings()
    if head is None:
        return f"{type(model).__name__} has no output head"
    if type(head) is not nn.Linear:  # FakeQuantizedLinear and peft's layers subclass or wrap Linear
        return f"output head is a {type(head).__name__}, not a plain Linear (fake-quantized or adapted)"
    return None


def logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) that ``model`` applies to its head's output, as TRL's kernels take them:
    Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``,
    Gemma's ``final_logit_softcapping``."""
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """The input of ``model``'s output head for every position of ``batch`` (padded, or padding-free
    with position ids): its backbone's last hidden state (peft's wrapper unwrapped; adapters live
    inside the backbone's layers)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state


def padding_free(inputs: dict) -> dict:
    """The batch's real tokens as one row: (1, N) ids and labels, and position ids that restart at 0
    for each sequence, which transformers reads as packed sequences (attention stays within each).
    Positions differ from the padded batch's only by an offset on left-padded rows, which rotary
    embeddings do not see. Each sequence's first token is left unlabelled: the token before it in
    the row belongs to another sequence (in the padded batch nothing predicts it either)."""
    mask = inputs["attention_mask"].bool()
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0], device=mask.device), mask.int().argmax(1)] = True
    labels = inputs["labels"].masked_fill(first, -100)
    positions = mask.long().cumsum(1) - 1
    return {"input_ids": inputs["input_ids"][mask][None], "position_ids": positions[mask][None],
            "labels": labels[mask][None]}


def generalized_jsd(student_hidden, student, teacher_hidden, teacher, labels, beta: float) -> torch.Tensor:
    """TRL's generalized JSD (``GKDTrainer.generalized_jsd_loss`` at temperature 1) averaged over the
    positions whose next-token label is not -100, from hidden states of shape (batch, length, hidden)
    that predict ``labels`` (batch, length) — already shifted. Only those positions are projected."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    mask = labels != -100
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    s_scale, s_cap = logit_transform(student)
    t_scale, t_cap = logit_transform(teacher)
    h_s = student_hidden[mask].to(s_head.weight.device)
    h_t = teacher_hidden[mask].to(t_head.weight.device)
    per_token, _entropy = ChunkedDivergenceFunction.apply(
        h_s, s_head.weight, s_head.bias, h_t, t_head.weight, t_head.bias, float(beta), 1.0, s_scale, s_cap,
        t_scale, t_cap)
    return per_token.sum() / mask.sum().clamp(min=1)


def liger_problem(device: str, student, teacher) -> str | None:
    """Why liger's fused linear JSD cannot compute this cell's loss (None: it can). Its Triton kernels
    run on CUDA; it takes no logit scale or soft-capping."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "needs liger-kernel: pip install 'qcompare[liger]' (liger-kernel==0.8.5)"
    if device != "cuda":
        return f"runs on CUDA only (this cell trains on {device})"
    for who, model in (("student", student), ("teacher", teacher)):
        scale, cap = logit_transform(model)
        if scale != 1.0 or cap is not None:
            return f"takes no logit scale or soft-capping, which the {who} applies; use loss_kernel = 'chunked'"
    return None


def liger_jsd(student_hidden, student, teacher_hidden, teacher, labels, beta: float) -> torch.Tensor:
    """``generalized_jsd`` through liger's ``LigerFusedLinearJSD`` (same β convention: 0 = forward KL,
    1 = reverse KL), on the positions whose label is not -100."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    mask = labels != -100
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    jsd = LigerFusedLinearJSD(jsd_beta=float(beta), temperature=1.0)
    return jsd(student_hidden[mask], s_head.weight, teacher_hidden[mask], t_head.weight)
