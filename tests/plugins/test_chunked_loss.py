"""The tiled GKD loss (no [batch, length, vocab] tensor) against the full-vocabulary one it replaces:
the same loss and gradients within fp32 rounding, on the trainer's own batches, for heads with a
logit scale or soft-capping, and the fallback where the tiled kernel cannot see the head."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

from qcompare.testing import tiny_chat, tiny_context, tiny_student, tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers.cost import CostMeter
from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None)


def teacher_of(family: str, tokenizer):
    if family == "qwen3":
        return tiny_teacher()
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "gemma2":  # soft-capped logits: cap · tanh(logits / cap)
        model = Gemma2ForCausalLM(Gemma2Config(**TINY, **ids, final_logit_softcapping=2.0))
    else:  # granite divides its logits by logits_scaling
        model = GraniteForCausalLM(GraniteConfig(**TINY, **ids, logits_scaling=4.0))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model.eval()


def loss_and_grads(teacher, tokenizer, kernel: str, beta: float, folder, skip_head: bool = True):
    params = GKDParams(lmbda=0.0, beta=beta, max_steps=1, max_length=64, max_new_tokens=4, loss_kernel=kernel)
    context = tiny_context(folder)
    trainer = GKDDistiller().make_trainer(teacher, tiny_student(teacher, skip_head=skip_head), tokenizer, tiny_chat(8),
                                          params, context, CostMeter("cpu"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads, trainer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("family,beta", [("qwen3", 0.0), ("qwen3", 0.5), ("qwen3", 1.0), ("gemma2", 0.5),
                                         ("granite", 0.0)])
def test_tiled_loss_and_gradients_equal_the_full_vocabulary_loss(tokenizer, family, beta, tmp_path):
    teacher = teacher_of(family, tokenizer)
    full, full_grads, _ = loss_and_grads(teacher, tokenizer, "full", beta, tmp_path)
    tiled, tiled_grads, trainer = loss_and_grads(teacher, tokenizer, "chunked", beta, tmp_path)
    assert trainer.loss_path == "chunked", trainer.loss_why
    assert full > 1e-4  # a quantized student differs from its teacher: the comparison means something
    assert abs(tiled - full) <= 1e-6, (tiled, full)
    assert full_grads.keys() == tiled_grads.keys() and len(full_grads) > 10  # every layer, head included
    for name, g in full_grads.items():
        scale = g.abs().max().item()
        assert (tiled_grads[name] - g).abs().max().item() <= 2e-6 * max(scale, 1.0), name


def test_a_fake_quantized_head_takes_the_full_loss_and_says_why(tokenizer, tmp_path):
    teacher = tiny_teacher()
    full, _, _ = loss_and_grads(teacher, tokenizer, "full", 0.5, tmp_path, skip_head=False)
    loss, _, trainer = loss_and_grads(teacher, tokenizer, "chunked", 0.5, tmp_path, skip_head=False)
    # the tiled kernel reads lm_head.weight: it would train against the float head, not the rounded one
    assert trainer.loss_path == "full"
    assert "FakeQuantizedLinear" in trainer.loss_why
    assert loss == full


@pytest.mark.parametrize("skip_head", [True, False])
def test_sft_loss_is_the_cross_entropy_of_the_students_own_head(tokenizer, tmp_path, skip_head):
    """TRL's tiled cross-entropy reads lm_head.weight: with a fake-quantized head it would train
    against the float head; such a student takes its own forward."""
    from qcompare_plugins.distillers.sft import SFTParams
    from qcompare_plugins.distillers.sft_trainer import make_trainer, to_prompt_completion

    student = tiny_student(tiny_teacher(), skip_head=skip_head)
    trainer = make_trainer(student, tokenizer, to_prompt_completion(tiny_chat(8)), SFTParams(max_steps=1, max_length=64),
                           tiny_context(tmp_path), CostMeter("cpu"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = -torch.log_softmax(logits[:, :-1].double(), -1)[mask].gather(-1, labels[mask][:, None]).mean().item()
    assert loss == pytest.approx(expected, abs=1e-5)
    assert trainer.loss_path.startswith("chunked" if skip_head else "full")


def uneven_data():
    """Chats of different lengths, so a batch has padding."""
    from datasets import Dataset

    turns = [("what is 1 plus 2", "it is 3"), ("what is 13 plus 4 plus 1 plus 1", "maybe it is 19 it is 19"),
             ("what is 7", "7"), ("what is 2 plus 2 plus 2", "it is 6 maybe")]
    return Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in turns * 2])


@pytest.mark.parametrize("left_pad", [False, True])
def test_a_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(tokenizer, tmp_path, left_pad):
    """The batch's real tokens as one row with per-sequence position ids: the same loss as the padded
    batch (right-padded as the data collator pads, and left-padded prompts as rollouts are)."""
    teacher = tiny_teacher()
    results = {}
    for free in (False, True):
        params = GKDParams(lmbda=0.0, beta=0.5, max_steps=1, max_length=64, max_new_tokens=4, padding_free=free,
                           loss_kernel="chunked")
        trainer = GKDDistiller().make_trainer(teacher, tiny_student(teacher, skip_head=True), tokenizer, uneven_data(),
                                              params, tiny_context(tmp_path), CostMeter("cpu"))
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        if left_pad:  # move each row's padding to its left, as a rollout's left-padded prompt has it
            order = torch.argsort(inputs["attention_mask"], dim=1, stable=True)
            inputs = {k: inputs[k].gather(1, order) for k in ("input_ids", "attention_mask", "labels")}
        lengths = inputs["attention_mask"].sum(1)
        assert lengths.min() < lengths.max() == inputs["input_ids"].shape[1]  # there is padding to leave out
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results[free] = loss.item(), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    (padded, padded_grads), (free, free_grads) = results[False], results[True]
    assert abs(free - padded) <= 1e-6, (free, padded)
    for name, g in padded_grads.items():
        assert (free_grads[name] - g).abs().max().item() <= 2e-6 * max(g.abs().max().item(), 1.0), name


def test_liger_where_it_cannot_run_is_refused_with_what_would_make_it_run(tokenizer, tmp_path):
    from qcompare.errors import QcompareError

    teacher = tiny_teacher()
    with pytest.raises(QcompareError, match=r"gkd: loss_kernel = 'liger' (needs liger-kernel: pip install 'qcompare\[liger\]'|"
                                            r"runs on CUDA only)"):
        loss_and_grads(teacher, tokenizer, "liger", 0.5, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel's fused linear JSD runs on CUDA, with liger-kernel installed")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_gives_the_tiled_loss_and_gradients(tokenizer, tmp_path, beta):
    teacher = tiny_teacher().cuda()
    results = {}
    for kernel in ("chunked", "liger"):
        params = GKDParams(lmbda=0.0, beta=beta, max_steps=1, max_length=64, max_new_tokens=4, loss_kernel=kernel)
        context = dataclasses.replace(tiny_context(tmp_path), device="cuda")
        trainer = GKDDistiller().make_trainer(teacher, tiny_student(teacher, skip_head=True).cuda(), tokenizer,
                                              tiny_chat(8), params, context, CostMeter("cuda"))
        inputs = {k: v.cuda() for k, v in trainer.data_collator([trainer.train_dataset[i] for i in range(4)]).items()}
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        assert trainer.loss_path == kernel
        results[kernel] = loss.item(), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    (tiled, tiled_grads), (liger, liger_grads) = results["chunked"], results["liger"]
    assert abs(liger - tiled) <= 1e-5 * max(1.0, abs(tiled))
    for name, g in tiled_grads.items():
        assert (liger_grads[name] - g).abs().max().item() <= 1e-4 * max(g.abs().max().item(), 1.0), name
