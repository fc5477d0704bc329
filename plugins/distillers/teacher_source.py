"""Where a GKD cell's teacher outputs come from, decided once per cell and handed to its trainer.

- **The model that computes them**: the float teacher; or, with LoRA and ``shared_teacher``, the student
  itself with its adapters and fake quantizers off, over the base weights it shares with the teacher
  (one copy of the weights instead of two: ``shared_teacher.py``).
- **The run's teacher cache**, on off-policy data batches an earlier cell computed: the head's input
  (``hidden``, the logits recomputed exactly) or the logits themselves (``logits``); rollouts always
  run the teacher.

``distill`` settles both before training (``share`` before the trainer exists, ``attach`` once it
wraps the student); the trainer asks ``logits``, ``hidden`` or ``model`` and never decides again;
``cost`` says in the cell's record what was used and why.
"""

from __future__ import annotations

import contextlib

import torch

from .shared_teacher import share_base_weights, teacher_mode, unshare_trainable
from .teacher_cache import TeacherCache


class TeacherSource:
    """The teacher side of one GKD cell (see the module's text)."""

    def __init__(self, teacher, meter):
        self.teacher, self.meter = teacher, meter
        self.layout = "separate"  # "shared" once the student computes the teacher over its weights
        self.cache: TeacherCache | None = None  # None again if it proves inexact for this model
        self._opened: TeacherCache | None = None  # saved and measured at the end either way
        self.cache_choice = ("off", "")
        self.fallback: str | None = None  # why a hidden-state cache was given up (not bitwise), if it was
        self._checked = False
        self._unwrap = lambda model: model
        self._float_teacher = teacher

    @classmethod
    def share(cls, teacher, student, params, meter) -> "TeacherSource":
        """Before the trainer: with LoRA and ``shared_teacher``, the student's own copy of the base weights
        is freed and it points at the teacher's."""
        source = cls(teacher, meter)
        if params.lora_r and params.shared_teacher:
            refused = share_base_weights(teacher, student)
            source.layout = "shared" if refused is None else f"separate ({refused})"
        return source

    def attach(self, trainer, cache_choice: tuple[str, str], params, shared_dir) -> None:
        """Once the trainer wraps the student: keep the sharing only if the trainer left the weights where
        they were, open the run's cache for ``cache_choice`` (mode, why), and hand the trainer this source."""
        if self.layout == "shared":
            unshare_trainable(trainer.model, self.teacher)
            storage = {p.data_ptr() for p in self.teacher.parameters()}
            if not any(p.data_ptr() in storage for p in trainer.model.parameters()):
                self.layout = "separate (the trainer copied the student's weights)"
        self._unwrap = trainer.accelerator.unwrap_model
        self._float_teacher = trainer.teacher_model  # as the trainer prepared it (DeepSpeed, compile)
        mode, _ = self.cache_choice = cache_choice
        if mode != "off":
            self.cache = self._opened = TeacherCache.for_run(self.teacher, shared_dir, params.teacher_cache_max_gb,
                                              params.teacher_cache_disk_gb, mode)
        trainer.teacher_source = self

    @property
    def shared(self) -> bool:
        return self.layout == "shared"

    def cache_mode(self) -> str | None:
        return self.cache.mode if self.cache is not None else None

    @contextlib.contextmanager
    def model(self, student):
        """The model that computes the teacher's outputs (``student``: the trainer's, possibly wrapped)."""
        if self.shared:
            unwrapped = self._unwrap(student)
            with teacher_mode(unwrapped):
                yield unwrapped
        else:
            self._float_teacher.eval()
            yield self._float_teacher

    def _cache_for(self, inputs, on_policy: bool):
        """(cache, key) for this batch, or (None, None): the cache only serves the data's own batches."""
        cache = None if on_policy else self.cache
        return (cache, cache.key(inputs)) if cache is not None else (None, None)

    def _count_cached(self, tokens: int) -> None:
        self.meter.add("teacher_cached_tokens", tokens)
        self.meter.add("teacher_cached_batches", 1)

    def _count_forward(self, tokens: int) -> None:
        self.meter.add("teacher_tokens", tokens)
        self.meter.add("teacher_forwards", 1)

    def hidden(self, student, inputs, batch, on_policy: bool, backbone_hidden):
        """The input of the teacher's head at every position of ``batch`` (``inputs`` as the model sees
        it: padded or padding-free): cached by an earlier cell, else one backbone forward (then kept)."""
        cache, key = self._cache_for(inputs, on_policy)
        if cache is not None and batch is not inputs:  # a padding-free batch is another tensor for the teacher
            key += ":padding-free"
        cached = cache.get(key) if cache is not None else None
        tokens = inputs["attention_mask"].sum().item()
        if cached is not None:
            self._count_cached(tokens)
            return cached.to(inputs["input_ids"].device)
        with self.meter.time("teacher_forward_seconds"), torch.no_grad(), self.model(student) as teacher:
            hidden = backbone_hidden(teacher, batch)
        self._count_forward(tokens)
        if cache is not None:
            cache.store(inputs, key, hidden)
        return hidden

    def logits(self, student, inputs, vocab: int, on_policy: bool):
        """The teacher's shifted logits: cached by an earlier cell, else one teacher forward (then kept)."""
        cache, key = self._cache_for(inputs, on_policy)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            self._count_cached(inputs["attention_mask"].sum().item())
            if cache.mode == "logits":
                return cache.expand(inputs, cached, vocab)
            with self.meter.time("teacher_head_seconds"), torch.no_grad(), self.model(student) as teacher:
                head = teacher.get_output_embeddings()
                self.meter.add("teacher_head_flops", 2 * head.weight.numel() * cached.shape[0] * cached.shape[1])
                return head_logits(teacher, cached.to(inputs["input_ids"].device))[:, :-1, :]
        captured = []
        with self.meter.time("teacher_forward_seconds"), torch.no_grad(), self.model(student) as teacher:
            hook = (teacher.get_output_embeddings().register_forward_pre_hook(lambda m, args: captured.append(args[0]))
                    if cache is not None and cache.mode == "hidden" else None)
            try:
                outputs = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            finally:
                if hook is not None:
                    hook.remove()
            if captured and not self._checked:  # once per cell: recomputing the head is exact here
                self._checked = True
                again = head_logits(teacher, captured[0])
                if again.shape != outputs.logits.shape or not torch.equal(again, outputs.logits):
                    self.fallback = (f"recomputing {type(teacher).__name__}'s output head from its input did "
                                     "not give the same logits bit for bit; every batch ran the teacher")
                    self.cache, cache = None, None
        self._count_forward(inputs["attention_mask"].sum().item())
        logits = outputs.logits[:, :-1, :]
        if cache is not None:
            cache.store(inputs, key, captured[0] if cache.mode == "hidden" else logits)
        return logits

    def save(self) -> None:
        if self._opened is not None:
            self._opened.save()

    def cost(self) -> dict:
        """What the cell's record says about its teacher side."""
        mode, why = self.cache_choice
        out = {"teacher_layout": self.layout,
               "teacher_cache": f"off: {self.fallback}" if self.fallback else f"{mode if self._opened is not None else 'off'}: {why}"}
        if self._opened is not None:
            out["teacher_cache_bytes"] = self._opened.disk_bytes()
        return out


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
