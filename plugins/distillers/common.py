"""What the sft and gkd trainers share: data checks, LoRA, TrainingArguments, a metered trainer
mixin (cost, NaN guard, log parts) and the resume-aware training run. Imported when a cell
trains (it imports torch and transformers); the parameters live in ``params``."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from qcompare.sdk import CellContext, DistillResult, QcompareError, weight_quantizers

from .cost import CostMeter, count_params
from .params import TrainingDivergedError, TrainParams


# --- data --------------------------------------------------------------------------


def check_data(data, distiller: str):
    """Return ``data`` with only its ``messages`` column, or raise a one-line QcompareError."""
    if data is None:
        raise QcompareError(f"distiller {distiller!r} needs training data; add `[data] train = ...` to the recipe")
    columns = list(getattr(data, "column_names", []) or [])
    if "messages" not in columns:
        raise QcompareError(
            f"distiller {distiller!r} needs a 'messages' column in the training data; found columns: {columns}"
        )
    if len(data) == 0:
        raise QcompareError(f"distiller {distiller!r} got empty training data; give at least one conversation")
    for i, messages in enumerate(data["messages"]):
        problem = _message_problem(messages)
        if problem:
            raise QcompareError(
                f"training data row {i}: 'messages' {problem}; each row must be a list of "
                "{role, content} dicts ending with an assistant turn after at least one other turn"
            )
    return data.select_columns(["messages"])


def _message_problem(messages) -> str | None:
    if not isinstance(messages, list) or len(messages) < 2:
        return "is not a list of at least two turns"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"has a turn that is not {{role: str, content: str}}: {m!r:.80}"
    if messages[-1]["role"] != "assistant":
        return f"ends with a {messages[-1]['role']!r} turn, not 'assistant'"
    return None


def check_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise QcompareError("the tokenizer has no pad token; the distillers need one (set tokenizer.pad_token)")
    if not getattr(tokenizer, "chat_template", None):
        raise QcompareError("the tokenizer has no chat template; the distillers format 'messages' with it")


# --- trainer setup -----------------------------------------------------------------


@contextlib.contextmanager
def as_before_training(student):
    """Put back what TRL's trainers change on the model they train and leave changed: the config's
    MoE router settings (SFT/GKD turn ``output_router_logits`` on for the load-balancing loss, and
    transformers' ``generate`` then fails computing that loss against the KV cache) and the fused
    forward it patches onto the instance."""
    configs = [c for c in (student.config, getattr(student.config, "text_config", None)) if c is not None]
    keys = ("output_router_logits", "router_aux_loss_coef")
    saved = [{k: getattr(c, k) for k in keys if hasattr(c, k)} for c in configs]
    had_forward = "forward" in student.__dict__
    try:
        yield
    finally:
        for config, values in zip(configs, saved):
            for key, value in values.items():
                setattr(config, key, value)
        if not had_forward:
            student.__dict__.pop("forward", None)


@contextlib.contextmanager
def fp32_master_weights(student, params: TrainParams):
    """Full fine-tuning of a bfloat16/float16 student on fp32 master weights.

    transformers' Trainer with ``bf16=True`` only autocasts: it keeps no fp32 copy of a model
    loaded in bf16, and an AdamW step of ~1e-5 is below half a bf16 ulp for most weights, so it is
    rounded away (measured: 84% of an N(0, 0.02) matrix never changed over 100 steps). The
    trainable weights are held in fp32 while training (autocast still computes in bf16 on a GPU)
    and return to their dtype afterwards, with the accumulated updates. LoRA (its adapters are
    fp32, the base is frozen) is left as it is."""
    half = (torch.bfloat16, torch.float16)
    cast = {} if params.lora_r else {name: p.dtype for name, p in student.named_parameters()
                                     if p.requires_grad and p.dtype in half}
    for name, p in student.named_parameters():
        if name in cast:
            p.data = p.data.float()
    try:
        yield bool(cast)
    finally:
        for name, p in student.named_parameters():
            if name in cast:
                p.data = p.data.to(cast[name])


@contextlib.contextmanager
def compiled_rounding(student, params: TrainParams):
    """With ``params.compile_rounding``, every weight fake quantizer of the student runs compiled
    (``torch.compile``): its quantize → dequantize is one fused kernel instead of one per elementwise
    op, in each forward and backward. The result is the same tensor (checked bit for bit on CPU
    against eager; fake ≡ converted checks every cell). Activation quantizers, whose shapes change
    every batch, stay eager."""
    quantizers = [q for m in student.modules() for q in weight_quantizers(m).values()] if params.compile_rounding else []
    for q in quantizers:
        q.forward = torch.compile(q.forward, dynamic=False)
    try:
        yield len(quantizers)
    finally:
        for q in quantizers:
            del q.forward


def lora_config(params: TrainParams):
    """A peft LoraConfig, or None for full fine-tuning (lora_r = 0)."""
    if params.lora_r == 0:
        return None
    from peft import LoraConfig

    targets = params.lora_targets.strip()
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def training_kwargs(params: TrainParams, context: CellContext) -> dict:
    """TrainingArguments shared by SFTConfig and GKDConfig."""
    seed = 0 if context.seed is None else int(context.seed)
    cpu = context.device == "cpu"
    return dict(
        output_dir=str(context.checkpoint_dir),
        learning_rate=params.learning_rate,
        per_device_train_batch_size=params.per_device_train_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        max_steps=params.max_steps,
        warmup_steps=params.warmup_steps or params.warmup_ratio,
        lr_scheduler_type=params.lr_scheduler_type,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        max_length=params.max_length,
        gradient_checkpointing=params.gradient_checkpointing,
        seed=seed,
        data_seed=seed,
        use_cpu=cpu,
        bf16=not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        logging_steps=1,
        # we fail the cell on a non-finite loss instead of hiding it in the log
        logging_nan_inf_filter=False,
        save_strategy="steps" if params.save_steps else "no",
        save_steps=params.save_steps or 500,
        save_total_limit=1,
        report_to=list(context.report_to) or "none",
        run_name=context.run_name or None,
        disable_tqdm=True,
        dataloader_num_workers=0,
        # transformers' default for torch >= 2.8 is torch's fused AdamW; the 8-bit one is torchao's
        **({"optim": "adamw_torch_8bit"} if params.optimizer == "adamw_8bit" else {}),
    )


class MeteredTrainerMixin:
    """Put in front of a TRL trainer: times every step, fails on a non-finite loss and adds
    the step's loss parts to the logged dict. Subclasses count tokens in compute_loss."""

    meter: CostMeter
    distiller_name: str = "train"

    def _init_meter(self, meter: CostMeter) -> None:
        self.meter = meter
        self._parts: dict[str, list[float]] = {}

    def record_part(self, key: str, value: float) -> None:
        self._parts.setdefault(key, []).append(float(value))

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.meter.time("step_seconds"):
            loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{self.distiller_name}: the loss is {value} at step {self.state.global_step + 1}; "
                "lower learning_rate, raise warm-up, or check the student and data for NaNs"
            )
        return loss

    def log(self, logs, start_time=None):
        # Parts go into logs before the Trainer copies them to state.log_history, which
        # checkpoints keep: a resumed cell's log then still holds the steps before the break.
        if "loss" in logs:
            logs.update({k: sum(v) / len(v) for k, v in self._parts.items()})
            self._parts = {}
        super().log(logs, start_time)


class _CellCallback(TrainerCallback):
    """Advances the cell's progress bar, counts steps and saves the cost with each checkpoint."""

    def __init__(self, meter: CostMeter, advance):
        self.meter = meter
        self.advance = advance
        self.seen = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.start("loop_seconds")
        self.seen = state.global_step
        if state.global_step:  # resumed: the bar starts where the checkpoint left off
            self.advance(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.add("steps", state.global_step - self.seen)
        self.advance(state.global_step - self.seen)
        self.seen = state.global_step
        if state.global_step >= state.max_steps:
            # the Trainer saves after the last step; the finished cell deletes it at once
            control.should_save = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.meter.stop("loop_seconds")

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():  # save_total_limit may already have rotated it away
            self.meter.save(checkpoint)


def run_training(name: str, trainer, meter: CostMeter, teacher, params: TrainParams, context: CellContext) -> DistillResult:
    """Train (resuming from the cell's last checkpoint if there is one) and build the result.

    Checkpoints are deleted once the cell finishes: they hold optimizer state and are big.
    """
    folder = context.checkpoint_dir
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last:
        meter.load(last)  # cost of the interrupted run(s) so far
    with context.progress.task(name, total=params.max_steps) as advance:
        trainer.remove_callback(PrinterCallback)  # the cell's log and progress bar replace its prints
        for callback in trainer.callback_handler.callbacks:
            # TensorBoard writes under output_dir by default, which holds the checkpoints
            # we delete; keep its events beside the cell's other results instead.
            if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
                callback.logging_dir = str(context.tensorboard_dir)
        trainer.add_callback(_CellCallback(meter, advance))
        meter.start("train_seconds")
        trainer.train(resume_from_checkpoint=last)
        meter.stop("train_seconds")
    processes = meter.sum_processes(trainer.accelerator)
    student = trainer.model
    if hasattr(student, "get_base_model"):
        # LoRA: keep the adapters beside the fake-quant layers (the model class stays the
        # transformers one). Merging them into the latent weights would re-quantize W + BA,
        # a different function from the one trained (measured: KL to the teacher 0.12 -> 0.20);
        # torchao's convert quantizes the base layers and leaves the adapters in float.
        student = student.get_base_model()
    student.eval()
    log = [_log_entry(e) for e in trainer.state.log_history if "loss" in e]
    cost = meter.summary(count_params(student), count_params(teacher) if teacher is not None else 0)
    cost["processes"] = processes  # data-parallel: each step covered processes x the batch
    if last:
        cost["resumed_from_step"] = int(Path(last).name.rsplit("-", 1)[1])  # an interrupted cell's checkpoint
    shutil.rmtree(folder, ignore_errors=True)  # checkpoints (optimizer state included) and TRL's model card
    return DistillResult(student=student, log=log, cost=cost)


def _log_entry(entry: dict) -> dict:
    out = {"step": int(entry["step"]), "loss": float(entry["loss"])}
    out.update({k: v for k, v in entry.items() if k not in out and isinstance(v, (int, float))})
    return out
