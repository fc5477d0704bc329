"""The GKD trainer: TRL's experimental GKDTrainer with measured cost, an fp32 loss, per
micro-batch normalisation, the run's teacher cache and the shared LoRA teacher."""

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
from .shared_teacher import teacher_mode  # noqa: E402
from .rollouts import RolloutEngine, weights_rounded_once  # noqa: E402
from .teacher_cache import TeacherCache  # noqa: E402


def jsd_loss(student_logits, teacher_logits, labels, beta: float):
    """TRL's generalized JSD, computed in fp32 (bf16 logits gave negative divergences
    elsewhere, ms-swift#10156) and averaged over the unmasked tokens of the micro-batch."""
    return GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta)


class MeteredGKDTrainer(MeteredTrainerMixin, GKDTrainer):
    """GKDTrainer with measured cost and two fixes, both covered by tests/test_gkd_loss.py:

    - the loss is taken in fp32 whatever the models' dtype;
    - each micro-batch's loss is a mean over *its own* completion tokens. TRL normalises
      by ``num_items_in_batch``, counted from the data's answers before a rollout replaces
      them, so an on-policy batch was scaled by (generated tokens / data answer tokens)
      and λ changed the step size as well as the data.

    Teacher logits come from the run's teacher cache when an earlier cell ran the batch, else
    from the float teacher or, with ``shared_teacher``, from the LoRA student itself with
    adapters and fake quantization off (tests/test_teacher_sharing.py).
    """

    distiller_name = "gkd"
    teacher_cache: TeacherCache | None = None
    shared_teacher: bool = False  # set by GKDDistiller.distill once the weights are shared
    cache_fallback: str | None = None  # why a hidden-state cache was given up (not bitwise), if it was
    _cache_checked = False
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
        teacher_logits = self.teacher_logits(model, inputs, student_outputs.logits.shape[-1])
        # logits at i predict token i+1; labels are -100 on prompt and padding
        loss = jsd_loss(student_outputs.logits[:, :-1, :], teacher_logits, inputs["labels"][:, 1:], self.beta)
        return (loss, student_outputs) if return_outputs else loss

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
            with self._as_teacher(model) as teacher:
                why = liger_problem(next(student.parameters()).device.type, student, teacher)
                why = why or next((f"the {w}'s {p}" for w, p in (("student", plain_head(student)),
                                                                 ("teacher", plain_head(teacher))) if p), None)
            if why is not None:
                raise QcompareError(f"gkd: loss_kernel = 'liger' {why}")
            return "liger", "liger-kernel's fused linear JSD from the final hidden states"
        if self.teacher_cache is not None and self.teacher_cache.mode == "logits":
            return "full", "the teacher cache keeps logits (teacher_cache = 'hidden' serves the tiled loss)"
        student = self.accelerator.unwrap_model(model)
        with self._as_teacher(model) as teacher:
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
            teacher_hidden = self.teacher_hidden(model, inputs, batch)
            jsd = liger_jsd if self.loss_path == "liger" else generalized_jsd
            with self._as_teacher(model) as teacher:
                return jsd(hidden[:, :-1], student, teacher_hidden[:, :-1], teacher, batch["labels"][:, 1:], self.beta)

        return self._redirect(model, student, loss, batch)

    def teacher_hidden(self, model, inputs, batch):
        """The input of the teacher's head at every position of ``batch`` (``inputs`` as the model
        sees it: padded or padding-free): from the run's hidden-state cache on an off-policy data
        batch that an earlier cell computed, else from one teacher backbone forward (kept for later
        cells). The tiled loss projects it, so a served batch is exactly a fresh one."""
        cache = self.teacher_cache if getattr(self, "_rollout_by", None) is None else None
        # a padding-free batch is another tensor for the teacher: its hidden states are kept apart
        key = cache.key(inputs) + (":padding-free" if batch is not inputs else "") if cache is not None else None
        cached = cache.get(key) if cache is not None else None
        tokens = inputs["attention_mask"].sum().item()
        if cached is not None:
            self.meter.add("teacher_cached_tokens", tokens)
            self.meter.add("teacher_cached_batches", 1)
            return cached.to(inputs["input_ids"].device)
        with self.meter.time("teacher_forward_seconds"), torch.no_grad(), self._as_teacher(model) as teacher:
            hidden = backbone_hidden(teacher, batch)
        self.meter.add("teacher_tokens", tokens)
        self.meter.add("teacher_forwards", 1)
        if cache is not None:
            cache.store(inputs, key, hidden)
        return hidden

    def teacher_logits(self, model, inputs, vocab: int):
        """The teacher's shifted logits: from the run's cache on an off-policy data batch that
        an earlier cell computed, else from one teacher forward (kept for later cells)."""
        cache = self.teacher_cache if getattr(self, "_rollout_by", None) is None else None
        key = cache.key(inputs) if cache is not None else None
        if cache is not None:
            cached = cache.get(key)
            if cached is not None:
                self.meter.add("teacher_cached_tokens", inputs["attention_mask"].sum().item())
                self.meter.add("teacher_cached_batches", 1)
                if cache.mode == "logits":
                    return cache.expand(inputs, cached, vocab)
                with self.meter.time("teacher_head_seconds"), torch.no_grad(), self._as_teacher(model) as teacher:
                    head = teacher.get_output_embeddings()
                    self.meter.add("teacher_head_flops", 2 * head.weight.numel() * cached.shape[0] * cached.shape[1])
                    return head_logits(teacher, cached.to(inputs["input_ids"].device))[:, :-1, :]
        tokens = inputs["attention_mask"].sum().item()
        captured = []
        with self.meter.time("teacher_forward_seconds"), torch.no_grad(), self._as_teacher(model) as teacher:
            hook = (teacher.get_output_embeddings().register_forward_pre_hook(lambda m, args: captured.append(args[0]))
                    if cache is not None and cache.mode == "hidden" else None)
            try:
                outputs = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            finally:
                if hook is not None:
                    hook.remove()
            if captured and not self._cache_checked:  # once per cell: recomputing the head is exact here
                self._cache_checked = True
                again = head_logits(teacher, captured[0])
                if again.shape != outputs.logits.shape or not torch.equal(again, outputs.logits):
                    self.cache_fallback = (f"recomputing {type(teacher).__name__}'s output head from its input did "
                                           "not give the same logits bit for bit; every batch ran the teacher")
                    self.teacher_cache, cache = None, None
        self.meter.add("teacher_tokens", tokens)
        self.meter.add("teacher_forwards", 1)
        logits = outputs.logits[:, :-1, :]
        if cache is not None:
            cache.store(inputs, key, captured[0] if cache.mode == "hidden" else logits)
        return logits

    @contextlib.contextmanager
    def _as_teacher(self, model):
        """The model that computes the teacher's outputs: the float teacher, or the LoRA student
        with its adapters and fake quantizers off when they share weights."""
        if self.shared_teacher:
            student = self.accelerator.unwrap_model(model)
            with teacher_mode(student):
                yield student
        else:
            self.teacher_model.eval()
            yield self.teacher_model


def head_logits(model, hidden):
    """The logits ``model`` computes from the input of its output head: the head, then what the
    model applies after it (Gemma's soft-capping, Cohere's scale, Granite's scaling), in its order."""
    logits = model.get_output_embeddings()(hidden)
    config = getattr(model.config, "text_config", None) or model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    if getattr(config, "logit_scale", None) is not None and config.model_type.startswith("cohere"):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    return logits


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
    # TRL turns the rollouts' KV cache off whenever gradient checkpointing is on, yet
    # unwrap_model_for_generation switches checkpointing off around generate(): keep the
    # cache (same tokens, generation linear instead of quadratic in length).
    trainer.generation_config.use_cache = True
    trainer.generation_kwargs["use_cache"] = True
    return trainer


