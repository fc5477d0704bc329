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
        if self.loss_path.startswith("full"):
            return self.full_vocabulary_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def full_vocabulary_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The causal-LM cross-entropy of the logits the student's own forward computes, head included."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        keys = ("input_ids", "attention_mask", "position_ids")
        outputs = model(**{k: inputs[k] for k in keys if k in inputs}, use_cache=False)
        logits = outputs.logits
        loss = ForCausalLMLoss(logits, inputs["labels"], logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


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
    why = plain_head(trainer.model)  # after peft: an adapter on the head counts too
    if why is not None:
        trainer.loss_path = f"full: the student's {why}"
    trainer._init_meter(meter)
    return trainer
