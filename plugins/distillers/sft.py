"""Supervised fine-tuning of the student on the data's reference answers (TRL SFTTrainer)."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from qcompare.api import CellContext, Distiller, DistillResult

from .common import MeteredTrainerMixin, TrainParams, check_data, check_tokenizer, lora_config, run_training, training_kwargs
from .cost import CostMeter
from .shared_teacher import unshare_trainable


class SFTParams(TrainParams):
    """SFT uses the shared training parameters only."""


def to_prompt_completion(data):
    """Split each conversation before its last (assistant) turn, so TRL's completion-only
    loss trains on the answer and not on the prompt."""
    return data.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=["messages"],
    )


class MeteredSFTTrainer(MeteredTrainerMixin, SFTTrainer):
    """SFTTrainer with measured cost (all its step time is student forward+backward)."""

    distiller_name = "sft"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.meter.add("student_tokens", inputs["attention_mask"].sum().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class SFTDistiller(Distiller):
    """Supervised fine-tuning (TRL SFTTrainer) on the data's reference answers; no teacher."""

    name = "sft"
    Params = SFTParams

    def keeps_base_weights(self, params: SFTParams) -> bool:
        return params.lora_r > 0  # LoRA trains adapters only

    def distill(self, teacher, student, tokenizer, data, params: SFTParams, context: CellContext) -> DistillResult:
        data = to_prompt_completion(check_data(data, self.name))
        check_tokenizer(tokenizer)
        meter = CostMeter(context.device)
        trainer = self.make_trainer(student, tokenizer, data, params, context, meter)
        if teacher is not None:  # the runner may have built the student over the teacher's memory
            unshare_trainable(trainer.model, teacher)
        # the teacher is not used; its parameter count is left out of the FLOPs
        return run_training(self.name, trainer, meter, None, params, context)

    def make_trainer(self, student, tokenizer, data, params, context, meter):
        args = SFTConfig(**training_kwargs(params, context), completion_only_loss=True)
        trainer = MeteredSFTTrainer(
            model=student,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(params),
        )
        trainer._init_meter(meter)
        return trainer
