"""The GKD trainer: TRL's experimental GKDTrainer with measured cost, an fp32 loss, per
micro-batch normalisation, and its teacher outputs from the cell's TeacherSource."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

with warnings.catch_warnings():
    # TRL warns on every import of trl.experimental; GKD lives there in TRL 1.16 (pinned).
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

# At lmbda=1 TRL suggests DistillationTrainer; a λ sweep needs one trainer for every λ, so
# that advice is noise in every on-policy cell.
logging.getLogger("trl.experimental.gkd.gkd_trainer").setLevel(logging.ERROR)

from trl.models.utils import _ForwardRedirection  # noqa: E402

from qcompare.sdk import QcompareError  # noqa: E402

from .chat_tokens import ReusedChatCollator  # noqa: E402
from .chunked_loss import (backbone_hidden, generalized_jsd, liger_jsd, liger_problem, padding_free,  # noqa: E402
                           plain_head)
from .common import MeteredTrainerMixin, lora_config, training_kwargs  # noqa: E402
from .rollouts import RolloutEngine, weights_rounded_once  # noqa: E402
from .teacher_source import TeacherSource  # noqa: E402


def jsd_loss(student_logits, teacher_logits, labels, beta: float):
    """TRL's generalized JSD, computed in fp32 (bf16 logits gave negative divergences
    elsewhere, ms-swift#10156) and averaged over the unmasked tokens of the micro-batch."""
    return GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta)


class MeteredGKDTrainer(MeteredTrainerMixin, GKDTrainer):
    """GKDTrainer with measured cost and two fixes, both covered by tests/plugins/test_gkd_loss.py:

    - the loss is taken in fp32 whatever the models' dtype;
    - each micro-batch's loss is a mean over *its own* completion tokens. TRL normalises
      by ``num_items_in_batch``, counted from the data's answers before a rollout replaces
      them, so an on-policy batch was scaled by (generated tokens / data answer tokens)
      and λ changed the step size as well as the data.

    Teacher outputs come from ``teacher_source`` (``teacher_source.py``), which ``distill`` settles once
    per cell: the float teacher or the shared LoRA student in teacher mode, and the run's cache.
    """

    distiller_name = "gkd"
    teacher_source: TeacherSource  # set by TeacherSource.attach
    params = None  # the cell's GKDParams, set by make_trainer (loss_kernel, rollouts, padding_free)
    rollouts_why: str = ""
    _engine = None  # the RolloutEngine, False when the student cannot have one
    loss_path: str | None = None  # "chunked" or "full", chosen on the first batch
    loss_why: str = ""
    _redirect = _ForwardRedirection()

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
        by_teacher = model is self.teacher_model or model is self.accelerator.unwrap_model(self.teacher_model)
        engine = None if by_teacher else self.rollout_engine(model)
        with self.meter.time("rollout_seconds"), no_router_loss(model), weights_rounded_once(model):
            if engine is not None:
                ids, mask, labels = engine.generate(inputs, generation_config)
            else:
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
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
        if self.loss_path is None:
            self.loss_path, self.loss_why = self.choose_loss(model)
        if self.loss_path in ("chunked", "liger"):
            loss = self.chunked_loss(model, inputs)
            return (loss, None) if return_outputs else loss
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        teacher_logits = self.teacher_source.logits(model, inputs, student_outputs.logits.shape[-1], self._on_policy())
        # logits at i predict token i+1; labels are -100 on prompt and padding
        loss = jsd_loss(student_outputs.logits[:, :-1, :], teacher_logits, inputs["labels"][:, 1:], self.beta)
        return (loss, student_outputs) if return_outputs else loss

    def _on_policy(self) -> bool:
        """Whether this step's batch was generated (a rollout): the teacher cache serves only data batches."""
        return getattr(self, "_rollout_by", None) is not None

    @property
    def engine(self) -> RolloutEngine | None:
        """The static-shape copy this cell's rollouts used, if any."""
        return self._engine or None

    def rollout_engine(self, student):
        """The student's static-shape inference copy (``RolloutEngine``), built on its first rollout,
        or None for rollouts on the training student itself (``rollouts = "dynamic"``, ``"auto"`` on
        CPU, or a student the copy cannot serve exactly: ``rollouts_why`` says why). On a GPU the copy
        holds the teacher's dtype (bf16 rollouts from fp32 master weights) and compiles a few buckets."""
        cuda, mode = next(student.parameters()).is_cuda, self.params.rollouts
        if mode == "dynamic" or (mode == "auto" and not cuda) or self._engine is False:
            if mode == "auto" and not cuda:
                self.rollouts_why = "rollouts = 'auto' on CPU: nothing compiles there (the copy saves no time)"
            return None
        if self._engine is None:
            dtype = next(self.accelerator.unwrap_model(self.teacher_model).parameters()).dtype if cuda else None
            self._engine = RolloutEngine.for_student(student, dtype=dtype, bucket=64 if cuda else 1) or False
            self.rollouts_why = (RolloutEngine.why_not(student) or "") if self._engine is False else (
                f"static KV cache on an inference copy ({dtype or 'the student dtype'}), prompts bucketed to "
                f"{self._engine.bucket} tokens, {'compiled' if cuda else 'not compiled on CPU'}")
        return self.engine

    def choose_loss(self, model) -> tuple[str, str]:
        """("chunked" | "full", why): the tiled loss where ``GKDParams.tiled_loss`` says so, both heads
        are plain Linear layers and no logits cache feeds the teacher side; once per cell."""
        if self.params.loss_kernel == "full":
            return "full", "as the recipe says (loss_kernel = 'full')"
        if self.params.loss_kernel == "liger":
            student = self.accelerator.unwrap_model(model)
            with self.teacher_source.model(model) as teacher:
                why = liger_problem(next(student.parameters()).device.type, student, teacher)
                why = why or next((f"the {w}'s {p}" for w, p in (("student", plain_head(student)),
                                                                 ("teacher", plain_head(teacher))) if p), None)
            if why is not None:
                raise QcompareError(f"gkd: loss_kernel = 'liger' {why}")
            return "liger", "liger-kernel's fused linear JSD from the final hidden states"
        if self.teacher_source.cache_mode() == "logits":
            return "full", "the teacher cache keeps logits (teacher_cache = 'hidden' serves the tiled loss)"
        student = self.accelerator.unwrap_model(model)
        with self.teacher_source.model(model) as teacher:
            for who, m in (("student", student), ("teacher", teacher)):
                why = plain_head(m)
                if why is not None:
                    return "full", f"the {who}'s {why}"
        device = next(student.parameters()).device.type
        if not self.params.tiled_loss(device, student.get_output_embeddings().weight.shape[0]):
            return "full", ("loss_kernel = 'auto' on CPU: a micro-batch's fp32 logits stay under 256 MB, where the "
                            "tiled kernel's extra projections cost more than the memory it saves")
        return "chunked", "tiled over tokens and vocabulary from the final hidden states (no [batch, length, vocab] tensor)"

    def chunked_loss(self, model, inputs):
        """The generalized JSD from both models' final hidden states: the logits exist a tile at a time.
        The whole loss runs inside the DDP wrapper's forward, as in TRL's DistillationTrainer: DDP
        then sees the head's weight in the graph of what its forward returned (else it marks the
        head unused, then ready a second time when its gradient arrives)."""
        student = self.accelerator.unwrap_model(model)
        batch = padding_free(inputs) if self.params.padding_free else inputs

        def loss(batch):
            hidden = backbone_hidden(student, batch)
            teacher_hidden = self.teacher_source.hidden(model, inputs, batch, self._on_policy(), backbone_hidden)
            jsd = liger_jsd if self.loss_path == "liger" else generalized_jsd
            with self.teacher_source.model(model) as teacher:
                return jsd(hidden[:, :-1], student, teacher_hidden[:, :-1], teacher, batch["labels"][:, 1:], self.beta)

        return self._redirect(model, student, loss, batch)


@contextlib.contextmanager
def no_router_loss(model):
    """A MoE model generates without computing its load-balancing loss: TRL turns
    ``output_router_logits`` on for training, and transformers 5.17's loss then fails against the
    KV cache's attention mask in ``generate``. Rollouts need no loss."""
    configs = []
    for m in {id(x): x for x in (model, getattr(model, "module", None), getattr(model, "base_model", None)) if x}.values():
        for c in (getattr(m, "config", None), getattr(getattr(m, "config", None), "text_config", None)):
            if c is not None and getattr(c, "output_router_logits", False):
                configs.append(c)
    for c in configs:
        c.output_router_logits = False
    try:
        yield
    finally:
        for c in configs:
            c.output_router_logits = True


def make_trainer(teacher, student, tokenizer, data, params, context, meter, callbacks=None):
    """A MeteredGKDTrainer for one cell: TRL's GKDConfig from the cell's parameters."""
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
        # TRL's collator, each chat tokenized once per process (a sweep's cells share it)
        data_collator=ReusedChatCollator(tokenizer=tokenizer, max_length=args.max_length),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(params),
        callbacks=callbacks,
    )
    trainer._init_meter(meter)
    trainer.params = params
    # the float teacher, no cache: what a trainer made on its own uses (GKDDistiller.distill attaches its own)
    TeacherSource(teacher, meter).attach(trainer, ("off", "none asked for"), params, None)
    # TRL turns the rollouts' KV cache off whenever gradient checkpointing is on, yet
    # unwrap_model_for_generation switches checkpointing off around generate(): keep the
    # cache (same tokens, generation linear instead of quadratic in length).
    trainer.generation_config.use_cache = True
    trainer.generation_kwargs["use_cache"] = True
    return trainer


