"""Supervised fine-tuning of the student on the data's reference answers (TRL SFTTrainer).

What a recipe reads; the trainer is ``sft_trainer``, imported when a cell trains."""

from __future__ import annotations

from qcompare.sdk import CellContext, Distiller, DistillResult

from .params import TrainParams


class SFTParams(TrainParams):
    """SFT uses the shared training parameters only."""


class SFTDistiller(Distiller):
    """Supervised fine-tuning (TRL SFTTrainer) on the data's reference answers; no teacher."""

    name = "sft"
    Params = SFTParams

    def keeps_base_weights(self, params: SFTParams) -> bool:
        return params.lora_r > 0  # LoRA trains adapters only

    def batch_key(self, params: SFTParams) -> tuple:
        return params.per_device_train_batch_size, params.gradient_accumulation_steps, params.max_length

    def planned_tokens(self, params: SFTParams) -> dict[str, float]:
        return {"student_tokens": params.planned_sequences * params.max_length}

    def distill(self, student, params: SFTParams, context: CellContext) -> DistillResult:
        from .common import (as_before_training, check_data, check_tokenizer, compiled_rounding, fp32_master_weights,
                             run_training)
        from .cost import CostMeter
        from .shared_teacher import unshare_trainable
        from .sft_trainer import to_prompt_completion

        teacher, tokenizer, data = context.teacher, context.tokenizer, context.data

        data = to_prompt_completion(check_data(data, self.name))
        check_tokenizer(tokenizer)
        meter = CostMeter(context.device)
        with as_before_training(student), fp32_master_weights(student, params) as master, \
                compiled_rounding(student, params) as compiled:
            trainer = self.make_trainer(student, tokenizer, data, params, context, meter)
            if teacher is not None:  # the runner may have built the student over the teacher's memory
                unshare_trainable(trainer.model, teacher)
            # the teacher is not used; its parameter count is left out of the FLOPs
            result = run_training(self.name, trainer, meter, None, params, context)
        result.cost["master_weights"] = "fp32" if master else "as the model"
        result.cost["rounding"] = f"compiled ({compiled} weight quantizers)" if compiled else "eager"
        result.cost["loss"] = trainer.loss_path
        return result

    def make_trainer(self, student, tokenizer, data, params, context, meter):
        """The cell's trainer (``distill`` trains with it)."""
        from .sft_trainer import make_trainer

        return make_trainer(student, tokenizer, data, params, context, meter)
