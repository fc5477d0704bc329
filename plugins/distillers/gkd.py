"""On-policy distillation (GKD, Agarwal et al. 2023) through TRL's experimental GKDTrainer.

This module is what a recipe and ``qcompare plugins`` read (no torch, no TRL); the trainer
itself is ``gkd_trainer``, imported when a cell trains.
"""

from __future__ import annotations

from pydantic import Field

from qcompare.api import CellContext, Distiller, DistillResult, RuntimeField
from qcompare.errors import QcompareError

from .params import TrainParams


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
    teacher_cache: bool = RuntimeField(
        True, description="reuse teacher logits on off-policy data batches across the run's cells (exact; "
        "stored in <run>/shared/teacher/)"
    )
    teacher_cache_max_gb: float = RuntimeField(
        2.0, gt=0, description="most the teacher cache keeps per process and teacher (answer tokens x vocab x 4 B)"
    )
    shared_teacher: bool = RuntimeField(
        True, description="with LoRA, the student with adapters and fake quantization off is the teacher "
        "(one copy of the weights)"
    )
    use_vllm: bool = Field(False, description="vLLM rollouts; not offered by TRL 1.16's GKDTrainer (see docs/scale.md)")


class GKDDistiller(Distiller):
    """Generalized knowledge distillation (TRL GKDTrainer): λ on-policy rollouts, β-JSD to the teacher."""

    name = "gkd"
    Params = GKDParams

    def keeps_base_weights(self, params: GKDParams) -> bool:
        # LoRA trains adapters only (a trainable shared weight is copied first: unshare_trainable)
        return params.lora_r > 0

    def distill(self, teacher, student, tokenizer, data, params: GKDParams, context: CellContext) -> DistillResult:
        from .common import as_before_training, check_data, check_tokenizer, fp32_master_weights, run_training
        from .cost import CostMeter
        from .shared_teacher import share_base_weights, unshare_trainable
        from .teacher_cache import TeacherCache

        data = check_data(data, self.name)
        check_tokenizer(tokenizer)
        check_vllm(params)
        meter = CostMeter(context.device)
        # the student's own copy of the base weights is freed here; the teacher's stays
        layout = "separate"
        if params.lora_r and params.shared_teacher:
            refused = share_base_weights(teacher, student)
            layout = "shared" if refused is None else f"separate ({refused})"
        with as_before_training(student), fp32_master_weights(student, params) as master:
            trainer = self.make_trainer(teacher, student, tokenizer, data, params, context, meter)
            if layout == "shared":
                unshare_trainable(trainer.model, teacher)
                storage = {p.data_ptr() for p in teacher.parameters()}
                if any(p.data_ptr() in storage for p in trainer.model.parameters()):
                    trainer.shared_teacher = True
                else:  # the trainer cast or moved the student: its weights are no longer the teacher's
                    layout = "separate (the trainer copied the student's weights)"
            cache = None
            if params.teacher_cache and not (params.seq_kd or params.lmbda == 1.0):
                cache = TeacherCache.for_run(teacher, context.shared_dir, params.teacher_cache_max_gb)
            trainer.teacher_cache = cache
            try:
                result = run_training(self.name, trainer, meter, teacher, params, context)
            finally:
                if cache is not None:
                    cache.save()
        result.cost["teacher_layout"] = layout
        result.cost["master_weights"] = "fp32" if master else "as the model"
        if cache is not None:
            result.cost["teacher_cache_bytes"] = cache.disk_bytes()
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
