"""Parameters every TRL-based distiller shares. Light on purpose: listing plugins and validating
recipes read these schemas without importing torch, transformers or TRL."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qcompare.sdk import AddedField, Params, QcompareError, RuntimeField


class TrainingDivergedError(QcompareError):
    """The loss became NaN or infinite; the cell fails at that step."""


class TrainParams(Params):
    """Training parameters common to every TRL-based distiller."""

    learning_rate: float = Field(1e-5, gt=0, description="peak learning rate of the AdamW optimizer")
    per_device_train_batch_size: int = Field(2, ge=1, description="sequences per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")
    max_steps: int = Field(100, ge=1, description="optimizer steps to train")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="linear warm-up as a fraction of max_steps")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up in steps (use this or warmup_ratio)")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"
    ] = Field("cosine", description="learning-rate schedule after warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = no clipping)")
    max_length: int = Field(1024, ge=8, description="longest training sequence in tokens (prompt + answer)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning of the student's latent weights")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_targets: str = Field(
        "all-linear", description="comma-separated module names LoRA wraps, or 'all-linear'"
    )
    optimizer: Literal["adamw", "adamw_8bit"] = AddedField(
        "adamw", description="'adamw': torch's fused AdamW, two fp32 states per trained parameter; 'adamw_8bit': "
        "torchao's AdamW8bit, block-quantized 8-bit states (a quarter of the memory; full fine-tuning of a 4B model "
        "saves ~24 GB)")
    compile_rounding: bool = RuntimeField(
        False, description="run each weight fake quantizer compiled (torch.compile): one fused kernel per weight "
        "instead of one per elementwise op, the same rounded tensors; pays on a GPU, compiles a few seconds per "
        "weight shape")
    save_steps: int = RuntimeField(
        50, ge=0, description="checkpoint every N steps so an interrupted cell resumes (0 = never)"
    )

    @property
    def planned_sequences(self) -> int:
        """Sequences trained on in one process: steps × micro-batch × accumulation."""
        return self.max_steps * self.per_device_train_batch_size * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        return self
