"""On-policy distillation (GKD, Agarwal et al. 2023) through TRL's experimental GKDTrainer."""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

with warnings.catch_warnings():
    # TRL warns on every import of trl.experimental; GKD lives there in TRL 1.16 (pinned).
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

from qcompare.api import CellContext, Distiller, DistillResult

from .common import MeteredTrainerMixin, TrainParams, check_data, check_tokenizer, lora_config, run_training, training_kwargs
from .cost import CostMeter


class GKDParams(TrainParams):
    """GKD's own knobs on top of the shared training parameters."""

    lmbda: float = Field(
        0.5, ge=0, le=1, description="probability a batch is the student's own rollouts (0 = off-policy, 1 = on-policy)"
    )
    beta: float = Field(
        0.5, ge=0, le=1, description="generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL"
    )
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature of rollouts (the divergence itself is taken at temperature 1)"
    )
    seq_kd: bool = Field(
        False, description="on off-policy batches, train on teacher-generated answers instead of the data's"
    )
    max_new_tokens: int = Field(128, ge=1, description="rollout length: tokens generated per prompt")


def jsd_loss(student_logits, teacher_logits, labels, beta: float):
    """TRL's generalized JSD, computed in fp32 (bf16 logits gave negative divergences
    elsewhere, ms-swift#10156) and averaged over the unmasked tokens of the micro-batch."""
    return GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta)


class MeteredGKDTrainer(MeteredTrainerMixin, GKDTrainer):
    """GKDTrainer with measured cost and two fixes, both covered by tests/test_gkd_loss.py:

    - the loss is taken in fp32 whatever the models' dtype;
    - each micro-batch's loss is a mean over *its own* completion tokens. TRL normalises
      by ``num_items_in_batch``, counted from the data's answers before a rollout replaces
      them, so an on-policy batch was scaled by (generated tokens / data answer tokens)
      and λ changed the step size as well as the data.
    """

    distiller_name = "gkd"

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._rollout_by = None
        # None: Trainer divides each micro-batch's token mean by the accumulation steps.
        loss = super().training_step(model, inputs, None)
        self.record_part("on_policy", self._rollout_by == "student")
        if self.seq_kd:
            self.record_part("teacher_rollout", self._rollout_by == "teacher")
        return loss

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        # TRL calls this through self, so an instance method may wrap its staticmethod.
        with self.meter.time("rollout_seconds"):
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
        by_teacher = model is self.teacher_model or model is self.accelerator.unwrap_model(self.teacher_model)
        self._rollout_by = "teacher" if by_teacher else "student"
        prompt_length = inputs["prompts"].shape[1]
        self.meter.add("tokens_generated", mask[:, prompt_length:].sum().item())
        self.meter.add("rollout_tokens", mask.sum().item())
        if not by_teacher:
            self.meter.add("student_rollout_tokens", mask.sum().item())
        return ids, mask, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs["attention_mask"].sum().item()
        self.meter.add("student_tokens", tokens)
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with self.meter.time("teacher_forward_seconds"), torch.no_grad():
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.meter.add("teacher_tokens", tokens)
        # logits at i predict token i+1; labels are -100 on prompt and padding
        loss = jsd_loss(
            student_outputs.logits[:, :-1, :], teacher_outputs.logits[:, :-1, :], inputs["labels"][:, 1:], self.beta
        )
        return (loss, student_outputs) if return_outputs else loss


class GKDDistiller(Distiller):
    """Generalized knowledge distillation (TRL GKDTrainer): λ on-policy rollouts, β-JSD to the teacher."""

    name = "gkd"
    Params = GKDParams

    def distill(self, teacher, student, tokenizer, data, params: GKDParams, context: CellContext) -> DistillResult:
        data = check_data(data, self.name)
        check_tokenizer(tokenizer)
        meter = CostMeter(context.device)
        trainer = self.make_trainer(teacher, student, tokenizer, data, params, context, meter)
        return run_training(self.name, trainer, meter, teacher, params, context)

    def make_trainer(self, teacher, student, tokenizer, data, params, context, meter, callbacks=None):
        args = GKDConfig(
            **training_kwargs(params, context),
            lmbda=params.lmbda,
            beta=params.beta,
            temperature=params.temperature,
            seq_kd=params.seq_kd,
            max_new_tokens=params.max_new_tokens,
        )
        teacher.eval()
        trainer = MeteredGKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(params),
            callbacks=callbacks,
        )
        trainer._init_meter(meter)
        return trainer
