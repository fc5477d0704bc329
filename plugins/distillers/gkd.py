"""On-policy distillation (GKD, Agarwal et al. 2023) through TRL's experimental GKDTrainer.

This module is what a recipe and ``qcompare plugins`` read (no torch, no TRL); the trainer
itself is ``gkd_trainer``, imported when a cell trains.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from qcompare.sdk import CellContext, Distiller, DistillResult, ModelFacts, QcompareError, RuntimeField

from .params import TrainParams


def _cache_mode(v):
    return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v


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
    teacher_cache: Annotated[Literal["auto", "hidden", "logits", "off"], BeforeValidator(_cache_mode)] = RuntimeField(
        "auto", description="reuse the teacher's work on off-policy data batches across the run's cells, exactly: "
        "'hidden' keeps the head's input and recomputes the logits, 'logits' keeps the logits; 'auto' uses "
        "'hidden' when other cells share the batches and the body is most of the teacher's FLOPs (qcompare plan "
        "says which); true/false mean auto/off")
    teacher_cache_max_gb: float = RuntimeField(
        2.0, gt=0, description="memory the teacher cache keeps per process and teacher; beyond it, entries go to "
        "disk (<run>/shared/teacher/) and are read memory-mapped")
    teacher_cache_disk_gb: float = RuntimeField(
        20.0, ge=0, description="disk the teacher cache may fill in the run folder, per teacher")
    shared_teacher: bool = RuntimeField(
        True, description="with LoRA, the student with adapters and fake quantization off is the teacher "
        "(one copy of the weights)"
    )
    rollouts: Literal["auto", "static", "dynamic"] = RuntimeField(
        "auto", description="'static' generates from an inference copy of the student (rounded weights, "
        "transformers' static KV cache, compiled on a GPU, prompts bucketed); 'dynamic' from the training student "
        "with a dynamic cache; 'auto': static on a GPU, dynamic on CPU (nothing compiles there). The same samples "
        "in fp32; on a GPU the copy holds the teacher's dtype")
    loss_kernel: Literal["auto", "chunked", "full", "liger"] = RuntimeField(
        "auto", description="'chunked' computes the divergence from the final hidden states a tile of tokens × "
        "vocabulary at a time (TRL's kernel; no [batch, length, vocab] tensor); 'full' builds both models' logits; "
        "'auto': chunked on a GPU, and on CPU where one micro-batch's fp32 logits would pass 256 MB; 'liger': "
        "liger-kernel's fused linear JSD (CUDA, pip install liger-kernel). Equal within fp32 rounding; a "
        "fake-quantized or adapted output head always takes 'full'")
    padding_free: bool = RuntimeField(
        False, description="with the chunked loss, run student and teacher on the batch's real tokens as one row "
        "(position ids restart per sequence; no FLOPs on padding). Pays with attention kernels that skip the "
        "masked blocks (flash/flex attention); with SDPA the packed row's attention costs more than the padding")
    use_vllm: bool = Field(False, description="vLLM rollouts; not offered by TRL 1.16's GKDTrainer (see docs/scale.md)")

    def tiled_loss(self, device: str, vocab: int) -> bool:
        """Whether the loss is tiled (``loss_kernel``; 'auto': on a GPU, or on CPU where a micro-batch's
        fp32 logits would pass ``AUTO_TILED_BYTES``: below that the tiled kernel's extra projections cost
        more time than the memory is worth, as on the toy model)."""
        if self.loss_kernel != "auto":
            return self.loss_kernel in ("chunked", "liger")
        return device != "cpu" or 4 * self.per_device_train_batch_size * self.max_length * vocab > AUTO_TILED_BYTES


AUTO_TILED_BYTES = 2**28


class GKDDistiller(Distiller):
    """Generalized knowledge distillation (TRL GKDTrainer): λ on-policy rollouts, β-JSD to the teacher."""

    name = "gkd"
    Params = GKDParams

    def keeps_base_weights(self, params: GKDParams) -> bool:
        # LoRA trains adapters only (a trainable shared weight is copied first: unshare_trainable)
        return params.lora_r > 0

    def batch_key(self, params: GKDParams) -> tuple | None:
        if params.seq_kd or params.lmbda == 1.0:  # no batch of the data's answers to share
            return None
        return params.per_device_train_batch_size, params.gradient_accumulation_steps, params.max_length

    def plan_note(self, params: GKDParams, model: ModelFacts, peers: int) -> str | None:
        mode, why = cache_choice(params, model, peers)
        return f"gkd teacher cache: {mode} — {why}"

    def planned_tokens(self, params: GKDParams) -> dict[str, float]:
        """Every sequence through the student (trained) and the teacher; a share λ of the batches
        generated by the student first, and with ``seq_kd`` the rest by the teacher."""
        sequences = params.planned_sequences
        tokens = sequences * params.max_length
        teacher_rolls = (1 - params.lmbda) if params.seq_kd else 0.0
        return {"student_tokens": tokens, "teacher_tokens": tokens,
                "student_rollout_tokens": params.lmbda * tokens, "teacher_rollout_tokens": teacher_rolls * tokens,
                "generated_tokens": (params.lmbda + teacher_rolls) * sequences * params.max_new_tokens}

    def distill(self, student, params: GKDParams, context: CellContext) -> DistillResult:
        from .common import (as_before_training, check_data, check_tokenizer, compiled_rounding, fp32_master_weights,
                             run_training)
        from .cost import CostMeter
        from .teacher_source import TeacherSource

        teacher, tokenizer, data = context.teacher, context.tokenizer, context.data

        data = check_data(data, self.name)
        check_tokenizer(tokenizer)
        check_vllm(params)
        meter = CostMeter(context.device)
        # where the teacher's outputs come from, decided here once (the trainer only asks it)
        source = TeacherSource.share(teacher, student, params, meter)
        with as_before_training(student), fp32_master_weights(student, params) as master, \
                compiled_rounding(student, params) as compiled:
            trainer = self.make_trainer(teacher, student, tokenizer, data, params, context, meter)
            source.attach(trainer, cache_choice(params, facts_of(teacher), context.peers), params, context.shared_dir)
            try:
                result = run_training(self.name, trainer, meter, teacher, params, context)
            finally:
                source.save()
        result.cost.update(source.cost())
        result.cost["master_weights"] = "fp32" if master else "as the model"
        result.cost["rounding"] = f"compiled ({compiled} weight quantizers)" if compiled else "eager"
        result.cost["loss"] = f"{trainer.loss_path}: {trainer.loss_why}"
        if params.lmbda > 0:
            engine = trainer.engine
            result.cost["rollouts"] = f"{'static' if engine else 'dynamic'}: {trainer.rollouts_why or 'as the recipe says'}"
            if engine is not None:
                result.cost["rollout_compiles"] = engine.compiles
                result.cost["rollout_compile_seconds"] = engine.compile_seconds
        return result

    def make_trainer(self, teacher, student, tokenizer, data, params, context, meter, callbacks=None):
        """The cell's trainer (``distill`` trains with it; benches time its steps directly)."""
        from .gkd_trainer import make_trainer

        return make_trainer(teacher, student, tokenizer, data, params, context, meter, callbacks)


def check_vllm(params: GKDParams) -> None:
    """vLLM rollouts: TRL 1.16 offers them in DistillationTrainer, not in GKDTrainer."""
    if not params.use_vllm:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise QcompareError("gkd: use_vllm = true needs vLLM on a CUDA machine: pip install vllm")
    raise QcompareError(
        "gkd: use_vllm = true is not available: TRL 1.16's GKDTrainer generates with transformers' "
        "generate (KV cache on); only trl.DistillationTrainer has vLLM rollouts (see docs/scale.md)"
    )


def facts_of(model) -> ModelFacts:
    """A loaded model's sizes, as ``plan`` reads them from its files."""
    config = getattr(model.config, "text_config", None) or model.config
    return ModelFacts(sum(p.numel() for p in model.parameters()), getattr(config, "vocab_size", None),
                      getattr(config, "hidden_size", None), bool(getattr(model.config, "tie_word_embeddings", False)))


def cache_choice(params: GKDParams, model: ModelFacts | None, peers: int) -> tuple[str, str]:
    """(mode, why): the teacher cache a cell uses ("hidden", "logits" or "off").

    'auto' keeps the head's input when another cell of the run trains on the same batches and
    reusing it pays: recomputing the head costs 2·vocab·hidden FLOPs per token of the teacher's
    2·(body + head), so a model whose head is half its per-token work or more saves too little."""
    if params.seq_kd or params.lmbda == 1.0:
        return "off", "no batch of the data's answers to reuse (λ = 1 or seq_kd)"
    if params.teacher_cache != "auto":
        return params.teacher_cache, "as the recipe says"
    if peers < 2:
        return "off", "no other cell of the run trains on the same batches"
    if model is None or not model.head_parameters:
        return "hidden", f"{peers} cells train on the same batches"
    body, head = model.body_parameters, model.head_parameters
    saved = body / (body + head)
    if saved < 0.5:
        return "off", (f"the output head is {head / (body + head):.0%} of the teacher's work per token: recomputing it "
                       "from cached hidden states would save under half of a teacher forward")
    return "hidden", (f"{peers} cells train on the same batches; a cached batch saves {saved:.0%} of a teacher forward "
                      f"and holds {model.hidden_size}-wide hidden states, {model.vocab_size / model.hidden_size:.0f}× "
                      "smaller than logits")
