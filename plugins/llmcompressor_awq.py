"""AWQ's side of the llm-compressor quantizers: layer mappings for every family (llm-compressor's, qcompare's,
or the Qwen3-MoE set for other mixtures of experts), every reader of a smoothed output balanced or refused,
and the smoothed float model held to the teacher's function. See ``qcompare_plugins.llmcompressor_calibration``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qcompare.sdk import QcompareError, checks, find_targets


def awq_mappings(model: nn.Module, quantizer: str = "awq"):
    """AWQ's smooth → balance layer mappings for ``model``: llm-compressor's own where it registers
    the architecture; the Qwen3-MoE mappings for any other mixture-of-experts model (their router
    balance keeps routing as it was; llm-compressor's fallback leaves routers out and changes which
    experts tokens go to); otherwise the first set whose layers all exist in the model, trying in
    turn qcompare's own for Falcon and GPT-NeoX layouts, llm-compressor's defaults and every other
    set it registers (OLMo-2 takes OLMo-3's). No set fits: a one-line error naming the families
    AWQ supports.

    Falcon and GPT-NeoX get norm → Linear pairs only: their qkv is fused (multi-query on Falcon),
    so its value rows are not the dense layer's inputs one to one (AutoAWQ and llm-compressor's
    own Bloom mapping leave that pair out too), and their GELU is no module to scale."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, AWQMapping, default_mappings

    arch = type(model).__name__
    falcon_qkv, up = "re:.*self_attention\\.query_key_value$", "re:.*mlp\\.dense_h_to_4h$"
    ours = [
        [AWQMapping("re:.*ln_attn$", [falcon_qkv]), AWQMapping("re:.*ln_mlp$", [up])],  # Falcon-40B/180B
        [AWQMapping("re:.*input_layernorm$", [falcon_qkv]), AWQMapping("re:.*post_attention_layernorm$", [up])],
        [AWQMapping("re:.*input_layernorm$", [falcon_qkv, up])],  # Falcon-7B: one norm feeds attention and MLP
        [AWQMapping("re:.*input_layernorm$", ["re:.*attention\\.query_key_value$"]),  # GPT-NeoX
         AWQMapping("re:.*post_attention_layernorm$", [up])],
    ]
    names = [n for n, _ in model.named_modules()]
    experts = find_targets(model, (), ("experts",))
    if arch in AWQ_MAPPING_REGISTRY:
        _resolve_as_oneshot(model, AWQ_MAPPING_REGISTRY[arch], experts, quantizer)
        return AWQ_MAPPING_REGISTRY[arch]
    if experts:  # its patterns name the per-expert layers oneshot splits them into
        mappings = AWQ_MAPPING_REGISTRY["Qwen3MoeForCausalLM"]
        # every layer they name must be there once oneshot has split the experts (one Linear each, named as
        # below): a router by another name would crash oneshot after validate had let the cell through
        split = names + [f"{t.name}.0.{proj}" for t in experts for proj in ("gate_proj", "up_proj", "down_proj")]
        missing = [p for m in mappings for p in (m.smooth_layer, *m.balance_layers) if not _matches_any(split, p)]
        if missing:
            routers = sorted({n.split(".")[-1] for n in names if n.endswith((".router", ".gate"))}) or ["none found"]
            raise QcompareError(f"{quantizer}: AWQ's mixture-of-experts mappings name {missing[0].removeprefix('re:')} "
                                f"and {arch} has no such layer (its routers: {', '.join(routers)}); AWQ takes "
                                "mixture-of-experts models whose router is named gate (Qwen3-MoE, Mixtral, OLMoE)")
        _resolve_as_oneshot(model, mappings, experts, quantizer)
        return mappings
    candidates = ours + [default_mappings] + list({id(m): m for m in AWQ_MAPPING_REGISTRY.values()}.values())
    for mappings in candidates:
        if all(_matches_any(names, m.smooth_layer) and all(_matches_any(names, b) for b in m.balance_layers)
               for m in mappings):
            return mappings
    known = sorted({a.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration") for a in AWQ_MAPPING_REGISTRY}
                   | {"Falcon", "GPTNeoX", "any mixture-of-experts model"})
    raise QcompareError(f"{quantizer}: no AWQ layer mappings fit {arch} (none of llm-compressor's or qcompare's sets "
                        f"names its layers); AWQ supports: {', '.join(known)}")


def with_every_reader(model: nn.Module, mappings, quantizer: str) -> tuple[list, dict[str, list[str]]]:
    """``mappings`` with every layer that reads a smoothing layer's output among its balance layers, and
    what was added (smoothing pattern → the patterns of the layers added to its balance).

    Smoothing divides the smoothing layer's output by per-channel scales; the function is kept only if every
    layer reading that output multiplies its weight's input columns by them. A set written for one family
    misses what another adds beside it (Qwen2-MoE's shared expert and its gate read the norm its routed
    experts read; llm-compressor's own Qwen2-MoE set leaves them out: logits move by 10%). The readers are
    found by running the model once on the probe batch: the modules holding a 2-D weight, or fused experts,
    whose input is a smoothing layer's output (the same storage). Each missing one is added by its name
    inside the block; where blocks differ (a dense first layer before mixture-of-experts ones), the mapping
    is split into one per kind of block, each restricted to its blocks. A reader AWQ cannot balance is refused
    in one line (QcompareError): one holding no 2-D weight to scale (Inkling's shared experts, 3-D weights
    of their own), or one outside the module llm-compressor reruns for the mapping (GLM-MoE-DSA's indexer)."""
    import dataclasses

    readers = _readers(model, mappings)
    experts = {t.name for t in find_targets(model, (), ("experts",))}
    names = [n for n, _ in model.named_modules()]

    def balanced(name, mapping) -> bool:  # fused experts by the names oneshot splits them into
        as_split = [f"{name}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")] if name in experts else [name]
        return any(_matches_any(as_split, b) for b in mapping.balance_layers)

    out, added = [], {}
    for mapping in mappings:
        kinds: dict[tuple, list[str]] = {}  # the balance patterns a block misses → its blocks
        for smooth, read_by in readers.items():
            if not _matches_any([smooth], mapping.smooth_layer):
                continue
            block = smooth.rpartition(".")[0]
            # only inside the module llm-compressor reruns for this mapping (its balance layers' lowest common
            # ancestor): a reader beyond it would give two mappings one parent, which its AWQ does not take,
            # so such a reader is refused
            within = _common_prefix([n for n in names if n.startswith(block + ".") and balanced(n, mapping)])
            unbalanced = [name for name in read_by if not balanced(name, mapping)] if within else []
            for name in unbalanced:
                module = model.get_submodule(name)
                weight = module._parameters.get("weight")
                if not (weight is not None and weight.ndim == 2 or name in experts):
                    why = f"{type(module).__name__} holds no 2-D weight whose input columns AWQ could scale"
                elif not name.startswith(within + "."):
                    why = f"it lies outside {within}, the module llm-compressor reruns to balance this mapping"
                else:
                    continue
                raise QcompareError(f"{quantizer}: AWQ's smoothing of {smooth} would change what {name} computes, "
                                    f"which reads its output: {why}; use gptq or torchao for this family")
            missing = ["re:.*" + re.escape(name[len(block) + 1:]) + "$" for name in unbalanced]
            kinds.setdefault(tuple(dict.fromkeys(missing)), []).append(block)
        extras = [b.removeprefix("re:") for kind in kinds for b in kind]
        if extras:
            added[mapping.smooth_layer.removeprefix("re:")] = list(dict.fromkeys(extras))
        if len(kinds) <= 1:
            extra = [m for m in next(iter(kinds), ()) if m not in mapping.balance_layers]
            out.append(dataclasses.replace(mapping, balance_layers=[*mapping.balance_layers, *extra]))
            continue
        for extra, blocks in kinds.items():
            only = "(?=(?:" + "|".join(re.escape(b) for b in blocks) + r")\.)"
            out.append(dataclasses.replace(mapping, smooth_layer=_within(only, mapping.smooth_layer),
                                           balance_layers=[_within(only, b) for b in [*mapping.balance_layers, *extra]]))
    return out, added


def _common_prefix(names: list[str]) -> str:
    """The lowest module containing all of ``names`` (a single name: the module itself)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) if parts else ""


def _within(prefix: str, pattern: str) -> str:
    """``pattern`` (a name, or a regex after ``re:``) matched only where ``prefix`` (a lookahead) matches too."""
    return "re:" + prefix + (pattern[3:] if pattern.startswith("re:") else re.escape(pattern) + "$")


def _readers(model: nn.Module, mappings) -> dict[str, list[str]]:
    """Smoothing layer name → the names of the weight-holding modules (any weight of two or more dimensions:
    a Linear, fused experts, a module of 3-D weights of its own) whose first input is that layer's output,
    observed on the probe batch."""
    from qcompare.sdk import expert_params

    smoothing = {n for n, _ in model.named_modules() if any(_matches_any([n], m.smooth_layer) for m in mappings)}
    outputs, readers, kept = {}, {}, []

    def wrote(name):
        def hook(module, args, out):
            t = checks.first_tensor(out)
            if t is not None:
                kept.append(t)  # alive until the trace ends: its storage is not reused by another tensor
                outputs[t.untyped_storage().data_ptr()] = name
        return hook

    def read(name):
        def hook(module, args, kwargs):
            t = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            source = outputs.get(t.untyped_storage().data_ptr()) if torch.is_tensor(t) else None
            if source is not None and name not in readers.setdefault(source, []):
                readers[source].append(name)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name in smoothing:
            handles.append(module.register_forward_hook(wrote(name)))
        holds = any(p is not None and p.ndim >= 2 for p in module._parameters.values())
        if (holds and not isinstance(module, nn.Embedding)) or expert_params(module):
            handles.append(module.register_forward_pre_hook(read(name), with_kwargs=True))
    try:
        checks.probe_logits(model)
    finally:
        for h in handles:
            h.remove()
    return readers


def _resolve_as_oneshot(model: nn.Module, mappings, experts, quantizer: str) -> None:
    """Resolve ``mappings`` as llm-compressor's AWQ does when oneshot starts (``match_modules_set`` over
    the modules, once the experts are split into one Linear each), here on the names alone, so a model
    they do not fit (a dense layer among expert layers, a router that is no Linear) is refused in one
    line at validate instead of crashing oneshot."""
    from compressed_tensors.utils.match import match_modules_set

    split = {t.name: t.weight.shape[0] for t in experts}
    modules = []
    for name, module in model.named_modules():
        if any(name.startswith(e + ".") for e in split):
            continue
        modules.append((name, module))
        for i in range(split.get(name, 0)):
            modules += [(f"{name}.{i}", _Named("Module"))]
            modules += [(f"{name}.{i}.{proj}", _Named("Linear")) for proj in ("gate_proj", "up_proj", "down_proj")]

    class Names:
        def named_modules(self):
            return iter(modules)

    arch = type(model).__name__
    for mapping in mappings:
        try:
            for smooth, *balance in match_modules_set(Names(), (mapping.smooth_layer, *mapping.balance_layers)):
                where = [n for n, m in modules if any(m is s for s in smooth)]
                if len(smooth) > 1:
                    raise ValueError(f"its smoothing layer matches {len(smooth)} layers in one block "
                                     f"({', '.join(where[:3])}), not one")
                unweighted = [n for n, m in modules for group in balance for b in group
                              if m is b and not isinstance(m, _Named) and not hasattr(m, "weight")]
                if unweighted:
                    raise ValueError(f"{unweighted[0]} ({type(dict(modules)[unweighted[0]]).__name__}) has no weight "
                                     "to balance")
        except ValueError as e:
            # llm-compressor prints sets of patterns in hash order: sorted, the line is the same every run
            first = re.sub(r"\{([^{}]*)\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}",
                           str(e).splitlines()[0].rstrip("."))
            raise QcompareError(f"{quantizer}: AWQ's mapping {mapping.smooth_layer.removeprefix('re:')} → "
                                f"{', '.join(b.removeprefix('re:') for b in mapping.balance_layers)} does not fit "
                                f"{arch} ({first}); its layers are not the ones these mappings were written for: use "
                                "gptq or torchao for this family") from None


class _Named(nn.Module):
    """A stand-in for a module oneshot will create, matched by name only."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind


def _matches_any(names: list[str], pattern: str) -> bool:
    rx = re.compile(pattern[3:]) if pattern.startswith("re:") else None
    return any(rx.fullmatch(n) if rx else n == pattern for n in names)


def recording_awq():
    """llm-compressor's AWQModifier, keeping past its finalize what it resolved and smoothed (it
    reports skipped smoothing only in log lines, which LLM_COMPRESSOR_LOG_DISABLED silences)."""
    from llmcompressor.modifiers.transform import AWQModifier
    from pydantic import PrivateAttr

    class RecordingAWQModifier(AWQModifier):
        _qcompare_smoothed: list = PrivateAttr(default_factory=list)
        _qcompare_added: dict = PrivateAttr(default_factory=dict)  # balance layers with_every_reader added

        def _log_error_metrics(self):  # on_finalize clears _error_metrics right after this
            self._qcompare_smoothed = [m["layer_name"] for m in self._error_metrics]
            super()._log_error_metrics()

        def skipped(self, model) -> list[str]:
            """Every layer a mapping names as smoothing layer that was not smoothed."""
            wanted = [n for mapping in self.mappings for n, _ in model.named_modules()
                      if _matches_any([n], mapping.smooth_layer)]
            done = set(self._qcompare_smoothed)
            return [n for n in dict.fromkeys(wanted) if n not in done]

    return RecordingAWQModifier




def smoothing_preserves_function(model: nn.Module, watch, mappings, context) -> None:
    """The smoothed float model (oneshot's on-the-fly rounding off) computes what the model computed before
    AWQ: each smoothing layer's output is divided by the scales its balance layers' weights were multiplied
    by, so only the smoothing layers' own outputs may move. A mapping that leaves out a layer reading a
    smoothed output (a shared expert beside the routed ones) fails the cell, naming it."""
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    smoothing = [n for n, _ in model.named_modules() if any(_matches_any([n], m.smooth_layer) for m in mappings)]
    model.apply(disable_quantization)
    try:
        watch.verdict_into(context.checks, "transform", model, checks.dtype_tolerance(model), "AWQ's smoothing",
                           may_change=smoothing)
    finally:
        model.apply(enable_quantization)
