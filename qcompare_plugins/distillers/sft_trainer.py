"""The SFT trainer: TRL's SFTTrainer with measured cost, on prompt/completion pairs."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from .common import MeteredTrainerMixin, lora_config, training_kwargs


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


def make_trainer(student, tokenizer, data, params, context, meter):
    """A MeteredSFTTrainer for one cell: completion-only loss on the data's answers."""
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
