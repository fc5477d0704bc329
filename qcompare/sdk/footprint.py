"""What a converted model holds, measured against the teacher it was made from: which weights
ended on a low-bit grid (coverage) and how many bits everything takes (true size).

Every teacher parameter is looked up at the same place in the converted model (through LoRA
wrappers). It is *quantized* when what sits there now holds codes — a tensor subclass that
stores codes (torchao's quantized tensors), an integer or packed tensor, or, where the
parameter is gone, the integer codes its module now keeps — and *float* when a float tensor of
its shape is still there. Bits are counted as stored: codes at the format's code width (packed),
scales and zero points in their stored dtype, float weights and LoRA adapters at their dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PARTS = ("body", "embeddings", "head")


@dataclass
class Weight:
    """One teacher parameter in the converted model."""

    name: str
    group: str  # what it is, for reports: "Linear", "3-D expert weights of Qwen3MoeExperts", "Qwen3RMSNorm", ...
    part: str  # body, embeddings or head
    numel: int
    quantized: bool
    bits: float  # as shipped: codes at the format's width, the rest as stored
    memory_bits: float  # as the converted model holds it in memory


@dataclass
class Footprint:
    weights: list[Weight]
    adapter_params: int = 0
    adapter_bits: float = 0.0
    memory_bytes: int = 0  # everything the converted model holds (tied tensors once)
    extra: dict[str, Any] = field(default_factory=dict)

    def _share(self, part: str | None) -> float:
        ws = [w for w in self.weights if part is None or w.part == part]
        total = sum(w.numel for w in ws)
        return sum(w.numel for w in ws if w.quantized) / total if total else 0.0

    @property
    def body_coverage(self) -> float:
        """The share of the body's weights (all but embeddings and head) on a low-bit grid."""
        return self._share("body")

    @property
    def model_coverage(self) -> float:
        return self._share(None)

    def float_groups(self, part: str = "body") -> dict[str, float]:
        """Share of ``part``'s weights left in float, by what they are, largest first."""
        total = sum(w.numel for w in self.weights if w.part == part)
        out: dict[str, float] = {}
        for w in self.weights:
            if w.part == part and not w.quantized:
                out[w.group] = out.get(w.group, 0.0) + w.numel / total
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def float_summary(self, most: int = 3) -> str:
        """The body's largest float groups as a coverage line names them ("Conv1d: 7% of the body; ...")."""
        left = [f"{g}: {s:.0%} of the body" for g, s in self.float_groups().items() if s >= 0.005][:most]
        return "; ".join(left) or "nothing identifiable"

    def as_size(self, nominal_bits: float | None) -> dict[str, Any]:
        """The cell record's ``size``: true and nominal widths, shares, bytes."""
        q = [w for w in self.weights if w.quantized]
        n_q = sum(w.numel for w in q)
        n_all = sum(w.numel for w in self.weights)
        model_bits = sum(w.bits for w in self.weights) + self.adapter_bits
        return {
            "nominal_bits": nominal_bits,
            "bits_per_weight": sum(w.bits for w in q) / n_q if n_q else None,
            "memory_bits_per_weight": sum(w.memory_bits for w in q) / n_q if n_q else None,
            "model_bits_per_weight": model_bits / n_all if n_all else None,
            "quantized_share_body": self.body_coverage,
            "quantized_share_model": self.model_coverage,
            "parameters": n_all,
            "adapter_parameters": self.adapter_params,
            "packed_bytes": int(round(model_bits / 8)),
            "memory_bytes": self.memory_bytes,
            **self.extra,
        }


# --- what a tensor holds -----------------------------------------------------------------


def _is_subclass_of(t, name: str) -> bool:
    return any(c.__name__ == name for c in type(t).__mro__)


def inner_tensors(t) -> list:
    """The plain tensors a quantized tensor subclass stores (torchao's data tensors,
    bitsandbytes' quantization state), else the tensor itself."""
    import torch

    if _is_subclass_of(t, "TorchAOBaseTensor"):
        names = list(t.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", []) or [])
        parts = [getattr(t, n, None) for n in names]
        return [x for p in parts if isinstance(p, torch.Tensor) for x in inner_tensors(p)]
    state = getattr(t, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit: packed codes, absmax (maybe nested), code tables
        extra = [getattr(state, "absmax", None), getattr(state, "code", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            extra += [getattr(nested, "absmax", None), getattr(nested, "code", None), getattr(state, "offset", None)]
        return [t.as_subclass(torch.Tensor)] + [x for x in extra if isinstance(x, torch.Tensor)]
    return [t]


def stored_bits(t) -> int:
    return sum(x.numel() * x.element_size() * 8 for x in inner_tensors(t))


def holds_codes(t) -> bool:
    """Whether a tensor stores codes rather than float values."""
    import torch

    if _is_subclass_of(t, "TorchAOBaseTensor") or getattr(t, "quant_state", None) is not None:
        return True
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def dtype_bits(dtype) -> int | None:
    """Bits of one element of a dtype, sub-byte ones included (torch.int4 → 4); None if unknown."""
    name = str(dtype)
    if "float8" in name:
        return 8
    if "float4" in name:
        return 4
    m = re.search(r"int(\d+)$", name)
    return int(m.group(1)) if m else None


def _bits(x) -> int:
    return x.numel() * x.element_size() * 8


def _codes_and_overhead(t, numel: int, code_bits: float | None) -> tuple[float, float, float]:
    """(codes as shipped, codes as held, scales and zero points as held) of one quantized tensor, in bits.

    Codes ship at the format's width: the tensor's own (torchao's ``target_dtype``), else the
    quantizer's declared ``code_bits``, else as held (a packed tensor already is)."""
    codes, *rest = inner_tensors(t)
    held = _bits(codes)
    width = dtype_bits(t.target_dtype) if getattr(t, "target_dtype", None) is not None else None
    width = width or code_bits
    shipped = min(numel * width, held) if width else held
    return shipped, held, sum(_bits(x) for x in rest)


# --- the walk ----------------------------------------------------------------------------


def _unwrap(module):
    """The layer under a LoRA (peft tuner) wrapper."""
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    return module


def _lookup(model, path: str):
    try:
        return _unwrap(model.get_submodule(path) if path else model)
    except AttributeError:
        return None


def _part(teacher, module, param) -> str:
    from torch import nn

    out = teacher.get_output_embeddings()
    if out is not None and getattr(out, "weight", None) is param:
        inp = teacher.get_input_embeddings()
        return "embeddings" if inp is not None and inp.weight is param else "head"
    return "embeddings" if isinstance(module, nn.Embedding) else "body"


def _group(module, attr: str, param) -> str:
    from qcompare.sdk.targets import expert_params

    cls = type(module).__name__
    if attr in expert_params(module):
        return f"3-D expert weights of {cls}"
    if attr.endswith("bias"):  # a Linear's bias, or experts' gate_up_proj_bias
        return "biases"
    if param.ndim == 1 and attr != "weight":
        return f"{cls}.{attr}"
    return cls


def measure(teacher, model, code_bits: float | None = None) -> Footprint:
    """The footprint of ``model`` (converted from ``teacher``): one Weight per teacher parameter."""
    from qcompare.sdk.targets import all_targets

    modules = dict(teacher.named_modules())
    weights, claimed = [], set()
    # the teacher's own tensors (an expert bias named ``gate_up_proj_bias``) are weights of their own,
    # never the scale overhead of the weight whose name they extend
    own = {path: set(m._parameters) for path, m in modules.items()}
    quantizable = {t.qualified for t in all_targets(teacher)}  # weights a format may turn into codes
    for name, param in teacher.named_parameters():
        path, _, attr = name.rpartition(".")
        tmod = modules[path] if path in modules else teacher
        group, part = _group(tmod, attr, param), _part(teacher, tmod, param)
        here = _lookup(model, path)
        t = None if here is None else (here._parameters.get(attr) if attr in here._parameters
                                       else here._buffers.get(attr, getattr(here, attr, None)))
        float_bits = param.numel() * param.element_size() * 8
        if t is not None and hasattr(t, "shape") and not holds_codes(t):
            # still float (at the converted model's own dtype: a bf16 student halves it)
            bits = t.numel() * t.element_size() * 8
            weights.append(Weight(name, group, part, param.numel(), False, bits, bits))
            claimed.add(id(t))
            continue
        if t is not None and hasattr(t, "shape"):
            shipped, held, overhead = _codes_and_overhead(t, param.numel(), code_bits)
            claimed.add(id(t))
            overhead += _attributed(here, attr, claimed, keep=own.get(path, set()))
            weights.append(Weight(name, group, part, param.numel(), True, shipped + overhead, held + overhead))
            continue
        # the parameter is gone: its module now keeps codes under other names (RTN's int8 codes),
        # or in submodules (llm-compressor splits fused 3-D experts into one Linear per expert). A bias,
        # a norm, an expert bias (no weight a format quantizes) is never codes: gone, it went with its
        # layer, in float.
        found = _codes_for(here, param.numel(), claimed, code_bits) \
            if here is not None and name in quantizable else None
        if found is None:
            weights.append(Weight(name, group, part, param.numel(), False, float_bits, float_bits))
            continue
        shipped, held = found
        weights.append(Weight(name, group, part, param.numel(), True, shipped, held))
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    # what the modules hold (a state dict would count bitsandbytes' quantization state twice: once
    # inside its weight, once as the entries it serializes it to), each tensor once
    memory, seen = 0, set()
    for m in model.modules():
        kept = [t for name, t in list(m._parameters.items()) + list(m._buffers.items())
                if t is not None and name not in m._non_persistent_buffers_set]
        for t in kept:
            for x in inner_tensors(t):
                if id(x) not in seen:
                    seen.add(id(x))
                    memory += _bits(x) // 8
    return Footprint(weights, sum(p.numel() for _, p in adapters),
                     float(sum(p.numel() * p.element_size() * 8 for _, p in adapters)), memory)


def planned(teacher, on_grid: set[str]) -> Footprint:
    """The footprint ``teacher`` would have with exactly the weights named in ``on_grid`` on a grid: its
    shares (``body_coverage``, ``float_groups``), checked before anything runs; bits count as float (a plan
    has no format). Works on a model built on the meta device."""
    modules = dict(teacher.named_modules())
    weights = []
    for name, param in teacher.named_parameters():
        path, _, attr = name.rpartition(".")
        tmod = modules[path] if path in modules else teacher
        bits = float(param.numel() * param.element_size() * 8)
        weights.append(Weight(name, _group(tmod, attr, param), _part(teacher, tmod, param), param.numel(),
                              name in on_grid, bits, bits))
    return Footprint(weights)


def _own_tensors(module) -> list:
    return [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]


def _codes_for(module, numel: int, claimed: set, code_bits) -> tuple[float, float] | None:
    """(bits as shipped, bits as held) of the code tensors under ``module`` that now stand for a
    weight of ``numel`` elements that is gone: the module's own codes (with every float tensor
    beside them that no teacher weight claims), else its submodules' in order, until they cover
    ``numel`` weights. None when there are none."""
    own = [t for t in _own_tensors(module) if holds_codes(t) and id(t) not in claimed]
    if own:
        main = max(own, key=lambda x: x.numel())
        shipped, held, overhead = _codes_and_overhead(main, numel, code_bits)
        claimed.add(id(main))
        overhead += _attributed(module, "", claimed, everything=True)
        return shipped + overhead, held + overhead
    shipped = held = covered = 0
    for sub in module.modules():
        for attr, t in list(sub._parameters.items()) + list(sub._buffers.items()):
            if covered >= numel:
                break
            if t is None or id(t) in claimed or not holds_codes(t):
                continue
            s, h, overhead = _codes_and_overhead(t, t.numel(), code_bits)
            claimed.add(id(t))
            overhead += _attributed(sub, attr, claimed)
            shipped, held, covered = shipped + s + overhead, held + h + overhead, covered + t.numel()
    return (shipped, held) if covered else None


def _attributed(module, attr: str, claimed: set, everything: bool = False, keep: set = frozenset()) -> float:
    """Bits of the tensors a module keeps beside a quantized weight for it (``weight_scale``,
    ``gate_up_proj_zero_point``; with ``everything``, every float tensor not claimed yet), but never
    those named in ``keep`` (the teacher's own parameters: a bias named ``gate_up_proj_bias``)."""
    total = 0.0
    for name, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is None or id(t) in claimed or name in keep:
            continue
        if name.startswith(attr + "_") or everything and name not in ("bias",):
            claimed.add(id(t))
            total += stored_bits(t)
    return total


def coverage_problem(fp: Footprint, minimum: float) -> str | None:
    """The one line that says why the body's coverage is too low, or None."""
    share = fp.body_coverage
    if share >= minimum:
        return None
    return (f"coverage: {share:.0%} of the body's weights quantized (minimum {minimum:.0%}); left in float: "
            f"{fp.float_summary()} — quantize them, or lower min_coverage for this quantizer in the recipe if that "
            "is the study")
