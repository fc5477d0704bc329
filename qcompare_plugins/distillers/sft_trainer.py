"""The SFT trainer: TRL's SFTTrainer with measured cost, on prompt/completion pairs."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from .chunked_loss import plain_head
from .common import MeteredTrainerMixin, lora_config, training_kwargs


def to_prompt_completion(data):
    """Split each conversation before its last (assistant) turn, so TRL's completion-only
    loss trains on the answer and not on the prompt."""
    return data.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=["messages"],
    )


class MeteredSFTTrainer(MeteredTrainerMixin, SFTTrainer):
    """SFTTrainer with measured cost (all its step time is student forward+backward).

    TRL computes the cross-entropy through its fused LM head, tiled from the final hidden states
    (no [batch, length, vocab] logits). That kernel reads ``lm_head.weight`` itself, so a student
    whose head is fake-quantized (a recipe with ``skip = []``) would be trained against its float
    head: such a student takes the loss from its own forward instead (``loss_path``)."""

    distiller_name = "sft"
    loss_path = "chunked: TRL's fused LM head, tiled from the final hidden states"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.meter.add("student_tokens", inputs["attention_mask"].sum().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def make_trainer(student, tokenizer, data, params, context, meter):
    """A MeteredSFTTrainer for one cell: completion-only loss on the data's answers."""
    args = SFTConfig(**training_kwargs(params, context), completion_only_loss=True)
    why = plain_head(student)
    trainer = MeteredSFTTrainer(
        model=student,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(params),
        compute_loss_func=None if why is None else full_vocabulary_loss,
    )
    if why is not None:
        trainer.loss_path = f"full: the student's {why}"
    trainer._init_meter(meter)
    return trainer


def full_vocabulary_loss(outputs, labels, num_items_in_batch=None):
    """The causal-LM cross-entropy of the logits the student's forward computed (its head included)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.logits
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
