"""Faster on-policy rollouts, exactly the same samples.

While ``generate`` decodes, the student's weights do not change, yet each decode step runs every
fake quantizer on every weight again (quantize → dequantize a whole layer per token). Two ways out:

``weights_rounded_once``: inside the block a fake quantizer given a Parameter returns the tensor it
computed for that Parameter the first time (keyed by the Parameter and its version, so an in-place
update is seen); activations, which change every step, are rounded as usual. The rounded weights
are the same tensors the student would compute, so the model computes the same logits and, with
the same random state, samples the same tokens (tests/plugins/test_rollouts.py). Generation still runs
the training student, with a dynamic KV cache, uncompiled.

``RolloutEngine``: an inference copy of the student that transformers can run with its static KV
cache (on CUDA compiled, with CUDA graphs; on CPU the same static-cache path, uncompiled). Prompts
are left-padded to a multiple of ``bucket`` tokens so a cell compiles a handful of shapes, and the
extra columns are stripped again. The copy is the student's module tree (``copy.deepcopy`` with
every Parameter and buffer swapped through the memo), in eval mode, and holds:

- one rounded copy of each fake-quantized weight, in the rollout dtype: the weight fake quantizer
  is replaced by an identity (activation quantizers are kept), and ``refresh`` writes the
  student's current rounded weights into it in place, so compiled graphs stay valid;
- every other Parameter (norms, float head, LoRA adapters) as a view of the student's storage when
  its dtype is the rollout dtype (no copy, always current), else a copy refreshed in place;
- the student's buffers themselves.

So with ``dtype=None`` it costs one rounded copy of the quantized weights; with fp32 master weights
and ``dtype=torch.bfloat16`` a bf16 copy of the whole model (half the student's bytes). Switches
are taken as they are when the engine is built (quantizers' ``enabled``, active adapters), and the
copy has no forward hooks (the training ones, such as ``enable_input_require_grads``, have no
business in rollouts). Rollouts run in eval mode: with ``lora_dropout`` > 0 the training student
would drop adapter inputs while sampling; the copy samples the model itself.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from qcompare.sdk import FakeQuantizer, activation_quantizer, rounded_weights, weight_quantizers

log = logging.getLogger(__name__)


@contextlib.contextmanager
def weights_rounded_once(model: nn.Module):
    """Round each fake-quantized weight once for the block (no gradients needed there)."""
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    originals = []
    for q in quantizers:
        memo: dict = {}
        forward = q.forward

        def once(x, *args, _forward=forward, _memo=memo, **kwargs):
            if not isinstance(x, nn.Parameter) or torch.is_grad_enabled():
                return _forward(x, *args, **kwargs)
            key = (id(x), x._version)
            if key not in _memo:
                _memo[key] = _forward(x, *args, **kwargs)
            return _memo[key]

        originals.append((q, q.__dict__.get("forward")))
        q.forward = once
    try:
        yield model
    finally:
        for q, before in originals:
            if before is None:
                del q.forward
            else:
                q.forward = before


class _Rounded(nn.Module):
    """Stands in for a weight fake quantizer in the copy: the weight it is given is already rounded.
    ``enabled`` stays True because ``FakeFloatLinear`` takes its format's own product (and rounds its
    inputs) only while its weight quantizer is enabled."""

    enabled = True

    def forward(self, x):
        return x


def _weight_quantizers(model: nn.Module) -> tuple[list[tuple[nn.Module, dict]], str | None]:
    """(module, {weight name: its fake quantizer}) for every module that rounds weights, or why the
    model holds a fake quantizer whose place in the computation this engine does not know."""
    hosts, known = [], set()
    for m in model.modules():
        known.add(id(activation_quantizer(m)))  # inputs: rounded as the student does
        if weights := weight_quantizers(m):
            hosts.append((m, weights))
    known |= {id(q) for _, qs in hosts for q in qs.values()}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer) and id(m) not in known:
            return [], f"{name} is a {type(m).__name__} outside the fake-quantized layers this engine knows"
    slots = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for m, qs in hosts:
        if any(slots[id(m._parameters[n])] > 1 for n in qs):
            return [], (f"a fake-quantized weight of {type(m).__name__} is tied to another layer "
                        "(one rounded copy cannot serve both)")
    return hosts, None


def _peft_problem(student: nn.Module) -> str | None:
    """Why a peft student cannot be copied exactly (None: it is not peft, or it can)."""
    if not hasattr(student, "peft_config"):
        return None
    kinds = {str(c.peft_type.value if hasattr(c.peft_type, "value") else c.peft_type)
             for c in student.peft_config.values()}
    if kinds != {"LORA"}:
        return f"peft {sorted(kinds)} adapters (only LoRA is copied)"
    for name, m in student.named_modules():
        if getattr(m, "merged_adapters", None):
            return f"{name} has merged adapters (its weight is no longer the student's latent weight)"
        if any(getattr(m, "use_dora", {}).values()):
            return f"{name} uses DoRA, whose norm reads the latent weight the copy replaces by the rounded one"
    return None


def _adapter_params(model: nn.Module) -> set[int]:
    """ids of peft adapter weights: they keep their dtype (peft computes the adapter branch in it)."""
    ids = set()
    for m in model.modules():
        for name in getattr(m, "adapter_layer_names", ()):
            part = getattr(m, name, None)
            if isinstance(part, nn.Module):
                ids |= {id(p) for p in part.parameters()}
    return ids


def _key(tensors) -> tuple:
    """Changes when any tensor is written in place (an optimizer step) or given new storage."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


class RolloutEngine:
    """An inference copy of the student: same module tree, every fake-quantized weight held already
    rounded (the weight fake quantizer replaced by an identity in the copy, activation quantizers
    kept), parameters that are not fake-quantized aliased to the student's own storage where dtype
    allows (no copy, always current). See the module docstring for what it holds.

    ``compiles`` counts the distinct generate shapes (batch, bucketed prompt, new tokens) and
    ``compile_seconds`` the time of their first calls (on CUDA: compilation and CUDA-graph capture).
    """

    def __init__(self, model, rounded, copied, aliased, bucket: int):
        self.model, self.bucket = model, bucket
        self._rounded = rounded  # [(student host, {name: copy Parameter}, quantizers)]
        self._copied = copied  # [(student Parameter, copy Parameter)]: another dtype
        self._aliased = aliased  # [(student Parameter, copy Parameter)]: views of the same storage
        self._seen: dict[int, tuple] = {}
        self._shapes: set[tuple] = set()
        self.compile_seconds = 0.0

    @property
    def compiles(self) -> int:
        return len(self._shapes)

    @property
    def compiled(self) -> bool:
        """Whether transformers compiled the copy's decoding step (it does on CUDA, not on CPU)."""
        return hasattr(self.model, "_compiled_call")

    @staticmethod
    def why_not(student: nn.Module) -> str | None:
        """Why ``for_student`` would return None for this student (None: it can be served)."""
        if not hasattr(student, "generate"):
            return f"{type(student).__name__} has no generate"
        if (problem := _peft_problem(student)) is not None:
            return problem
        devices = {p.device for p in student.parameters()}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            return f"its weights are on {sorted(map(str, devices))} (one device, not meta, is needed)"
        return _weight_quantizers(_root(student))[1]

    @classmethod
    def for_student(cls, student: nn.Module, dtype: torch.dtype | None = None, bucket: int = 64):
        """The engine for ``student``, or None (reason logged; ``why_not`` returns it) when the copy
        could not compute exactly what the student computes."""
        if (reason := cls.why_not(student)) is not None:
            log.info("on-policy rollouts stay on the training student: %s", reason)
            return None
        root = _root(student)
        hosts, _ = _weight_quantizers(root)
        memo, rounded, copied, aliased = {}, [], [], []
        skip = {id(p) for _, qs in hosts for q in qs.values() for p in q.parameters()}  # range-learned scales
        with torch.no_grad():
            for host, qs in hosts:
                memo.update({id(q): _Rounded() for q in qs.values()})  # not deep-copied: its cached scales are big
                slots = {}
                for name, t in rounded_weights(host).items():
                    slot = torch.empty_strided(t.size(), t.stride(), dtype=dtype or t.dtype, device=t.device)
                    slots[name] = memo[id(host._parameters[name])] = nn.Parameter(slot.copy_(t), requires_grad=False)
                rounded.append((host, slots, list(qs.values())))
            adapters = _adapter_params(root)
            for p in root.parameters():
                if id(p) in memo or id(p) in skip:
                    continue
                if dtype in (None, p.dtype) or not p.is_floating_point() or id(p) in adapters:
                    memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
                    aliased.append((p, memo[id(p)]))
                else:
                    memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    copied.append((p, memo[id(p)]))
            memo.update({id(b): b for b in root.buffers()})
            model = copy.deepcopy(root, memo)
        _for_inference(model, root, hosts)
        engine = cls(model, rounded, copied, aliased, bucket)
        for host, slots, qs in rounded:
            engine._seen[id(host)] = engine._host_key(host, slots, qs)
        for p, _ in copied:
            engine._seen[id(p)] = _key([p])
        return engine

    @staticmethod
    def _host_key(host, slots, quantizers) -> tuple:
        tensors = [host._parameters[n] for n in slots] + [p for q in quantizers for p in q.parameters()]
        return _key(tensors), tuple(getattr(q, "enabled", True) for q in quantizers)

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Bring the copy up to the student's current weights, in place (no re-allocation, so compiled
        graphs and CUDA graphs stay valid). Only what changed is rounded again, judged by the
        Parameters' version counters; writes through ``.data`` bypass them, so pass ``force=True``
        after such a write."""
        for host, slots, quantizers in self._rounded:
            key = self._host_key(host, slots, quantizers)
            if force or self._seen.get(id(host)) != key:
                for name, t in rounded_weights(host).items():
                    slots[name].copy_(t)
                self._seen[id(host)] = key
        for p, c in self._copied:
            key = _key([p])
            if force or self._seen.get(id(p)) != key:
                c.copy_(p)
                self._seen[id(p)] = key
        for p, c in self._aliased:
            if c.data_ptr() != p.data_ptr():  # the student got new storage (``p.data = ...``)
                if c.dtype != p.dtype or c.shape != p.shape:
                    raise RuntimeError("the student's weights changed dtype or shape since its RolloutEngine "
                                       "was built; build a new one")
                c.data = p.detach()

    def generate(self, inputs, generation_config):
        """(ids, attention_mask, labels) exactly as TRL's ``GKDTrainer.generate_on_policy_outputs``
        returns them for the student (prompt columns = ``inputs["prompts"].shape[1]``)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL warns on every import of trl.experimental
            from trl.experimental.gkd import GKDTrainer

        self.refresh()
        return GKDTrainer.generate_on_policy_outputs(_Bucketed(self), inputs, generation_config)

    def _generate(self, input_ids, attention_mask, generation_config, **kwargs):
        """The copy's generate on prompts left-padded to the bucket, the extra columns stripped again."""
        extra = -input_ids.shape[1] % self.bucket
        pad = generation_config.pad_token_id
        ids = F.pad(input_ids, (extra, 0), value=pad if isinstance(pad, int) else 0)
        mask = F.pad(attention_mask, (extra, 0), value=0)  # positions count unmasked tokens only
        config = _static(generation_config, input_ids.shape[1], extra, kwargs)
        shape = (ids.shape[0], ids.shape[1], config.max_new_tokens)
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        if shape not in self._shapes:
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            self._shapes.add(shape)
            self.compile_seconds += time.perf_counter() - start
        out.sequences = out.sequences[:, extra:]
        return out


class _Bucketed:
    """What TRL's ``generate_on_policy_outputs`` takes for a model: one with ``generate``."""

    def __init__(self, engine: RolloutEngine):
        self.generate = engine._generate


def _root(student: nn.Module) -> nn.Module:
    """The transformers model (peft's LoRA layers are injected into it, and it generates alike)."""
    return student.get_base_model() if hasattr(student, "peft_config") else student


def _static(generation_config, prompt_length: int, extra: int, overrides: dict):
    """The caller's config (and ``generate`` keywords) for the padded prompts, with a static cache."""
    config = copy.deepcopy(generation_config)
    for name, value in overrides.items():  # TRL passes return_dict_in_generate
        setattr(config, name, value)
    if config.max_new_tokens is None:  # max_length counts prompt columns, which padding adds
        config.max_new_tokens = config.max_length - prompt_length
    if config.min_length:
        config.min_length += extra
    config.cache_implementation, config.use_cache = "static", True
    return config


def _for_inference(model: nn.Module, root: nn.Module, hosts) -> None:
    """The deep copy as an inference model: experts back to their own class, eval, no training hooks."""
    names = {id(m): n for n, m in root.named_modules()}
    for host, _ in hosts:
        if hasattr(host, "drop_fake_quantizers"):  # its forward would round on every call
            model.get_submodule(names[id(host)]).drop_fake_quantizers()
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    for config in (model.config, getattr(model.config, "text_config", None)):
        if getattr(config, "output_router_logits", False):  # rollouts need no load-balancing loss
            config.output_router_logits = False
    model.eval()
