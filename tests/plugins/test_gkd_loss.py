"""The GKD loss the gkd distiller trains with, against the paper's definition written out here.

Generalized JSD (Agarwal et al. 2023, eq. 1) with p_t the teacher and p_s the student:
  β = 0: KL(p_t || p_s) (forward),  β = 1: KL(p_s || p_t) (reverse),
  else:  β·KL(p_t || m) + (1−β)·KL(p_s || m),  m = β·p_t + (1−β)·p_s,
averaged over the tokens whose label is not -100.
"""

from __future__ import annotations

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from qcompare.testing import tiny_chat, tiny_context, tiny_student, tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers.cost import CostMeter
from qcompare_plugins.distillers.gkd import GKDDistiller, GKDParams
from qcompare_plugins.distillers.gkd_trainer import jsd_loss


def kl(p, q):
    """Σ_v p·log(p/q) per position, directly on probabilities."""
    return (p * (p.log() - q.log())).sum(-1)


def reference_jsd(student_logits, teacher_logits, labels, beta, temperature=1.0):
    p_s = torch.softmax(student_logits.double() / temperature, -1)
    p_t = torch.softmax(teacher_logits.double() / temperature, -1)
    if beta == 0:
        d = kl(p_t, p_s)
    elif beta == 1:
        d = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        d = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    return d[labels != -100].mean()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    # different sharpness, so forward and reverse KL differ clearly
    student = torch.randn(3, 9, 40, generator=g)
    teacher = 4 * torch.randn(3, 9, 40, generator=g)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :6] = -100  # left padding + prompt
    labels[2, -2:] = -100  # right padding
    # masked positions get wild logits: if the mask leaked, the loss would show it
    student[labels == -100] *= 50
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trl_generalized_jsd_matches_reference(logits, beta):
    student, teacher, labels = logits
    ours = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    expected = reference_jsd(student, teacher, labels, beta)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - expected.item()) < 1e-5, (beta, ours.item(), expected.item())


def test_endpoints_are_forward_and_reverse_kl_not_each_other(logits):
    student, teacher, labels = logits
    forward = reference_jsd(student, teacher, labels, 0.0).item()
    reverse = reference_jsd(student, teacher, labels, 1.0).item()
    assert abs(forward - reverse) > 0.1  # else the two checks below could not tell them apart
    assert GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.0).item() == pytest.approx(forward, abs=1e-5)
    assert GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=1.0).item() == pytest.approx(reverse, abs=1e-5)


def test_temperature_scales_both_distributions(logits):
    student, teacher, labels = logits
    hot = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.5, temperature=2.0)
    assert hot.item() == pytest.approx(reference_jsd(student, teacher, labels, 0.5, temperature=2.0).item(), abs=1e-5)
    assert abs(hot.item() - reference_jsd(student, teacher, labels, 0.5).item()) > 1e-3


def test_loss_is_fp32_for_bf16_logits(logits):
    student, teacher, labels = (t.bfloat16() if t.is_floating_point() else t for t in logits)
    loss = jsd_loss(student, teacher, labels, beta=0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_jsd(student, teacher, labels, 0.5).item(), abs=1e-5)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    teacher = tiny_teacher()
    data = tiny_chat(8)
    # temperature 2 is the rollout temperature; the loss must still be taken at 1
    params = GKDParams(lmbda=0.0, beta=0.5, temperature=2.0, max_steps=1, max_length=64, max_new_tokens=4)
    context = tiny_context(tmp_path_factory.mktemp("cell"))
    return GKDDistiller().make_trainer(teacher, tiny_student(teacher), tokenizer, data, params, context, CostMeter("cpu"))


def _batch_and_expected(trainer):
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        s = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = trainer.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = reference_jsd(s[:, :-1], t[:, :-1], inputs["labels"][:, 1:], 0.5, temperature=1.0)
    return inputs, expected.item()


def test_trainer_loss_is_reference_jsd_at_temperature_one(trainer):
    inputs, expected = _batch_and_expected(trainer)
    assert expected > 1e-4  # the student is fake-quantized: it differs from the teacher
    loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_step_loss_is_a_token_mean_whatever_num_items_in_batch_says(trainer):
    # TRL counts num_items_in_batch from the data's answers before a rollout replaces them;
    # our trainer must average over the batch's own completion tokens instead.
    inputs, expected = _batch_and_expected(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which we skip
    loss = trainer.training_step(trainer.model, inputs, num_items_in_batch=torch.tensor(10_000))
    trainer.model.zero_grad()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
