"""Which weights a quantizer quantizes: one way to find them, one grammar to leave some out.

Every built-in quantizer finds its weights here, and a third-party one may too
(``find_targets(model, skip, kinds)``). A target is one weight tensor of a module, of a kind:

- ``linear``     ``nn.Linear.weight``, (out, in)
- ``conv1d``     transformers' ``Conv1D.weight`` (GPT-2 family), stored transposed: (in, out)
- ``embedding``  ``nn.Embedding.weight``, (vocab, dim)
- ``experts``    a 3-D parameter of a mixture-of-experts module (transformers 5 keeps a layer's
                 experts fused: ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)); found by
                 what the module holds — a module with ``num_experts`` and 3-D parameters whose
                 first dimension is that number — not by a list of model families. A module
                 that sets ``is_transposed`` (transformers' flag) stores (E, in, out).
- ``router``     the 2-D ``weight`` (E, hidden) of an experts module's sibling that scores the
                 experts (a ``*TopKRouter``, or an ``nn.Linear`` gate); never a ``linear`` target.

The skip grammar (``skip`` in every built-in quantizer's parameters), one pattern at a time:

- ``re:<regex>``  the module's full name matches the regular expression (``re.fullmatch``),
                  the form llm-compressor's ``ignore`` uses;
- a glob          over full module names (``*.mlp.*``, ``model.layers.0.*``);
- a name          the module's full name or its last parts (``lm_head`` matches
                  ``model.lm_head``; ``mlp.experts`` matches every layer's experts).

A pattern also matches a target by its parameter's full name (``*.experts.down_proj``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

KINDS = ("linear", "conv1d", "embedding", "experts", "router")


@dataclass(frozen=True)
class Target:
    """One weight tensor to quantize: ``getattr(module, param)``."""

    name: str  # the module's full name in the model
    module: Any
    kind: str
    param: str = "weight"

    @property
    def qualified(self) -> str:
        """The parameter's full name (``model.layers.0.mlp.experts.down_proj``)."""
        return f"{self.name}.{self.param}" if self.name else self.param

    @property
    def weight(self):
        return getattr(self.module, self.param)

    @property
    def in_features(self) -> int:
        """The length along which a weight's groups run (a row of the matrix the layer multiplies by)."""
        shape = self.weight.shape
        if self.kind == "conv1d":
            return shape[0]
        if self.kind == "experts":
            return shape[1] if getattr(self.module, "is_transposed", False) else shape[2]
        return shape[1]

    @property
    def numel(self) -> int:
        return self.weight.numel()


def matches(name: str, pattern: str) -> bool:
    """Whether one skip pattern names ``name`` (a module's or parameter's full name)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def skipped(target_or_name, patterns: Iterable[str]) -> bool:
    names = ((target_or_name.name, target_or_name.qualified) if isinstance(target_or_name, Target)
             else (target_or_name,))
    return any(matches(n, p) for p in patterns for n in names)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is not a hard requirement of a third-party quantizer
        return None
    return Conv1D


def expert_params(module) -> list[str]:
    """The 3-D expert weights a module holds directly (none if it is no experts module)."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.ndim == 3 and p.shape[0] == n]


def router_modules(model) -> set[int]:
    """ids of the modules that route tokens to experts: a sibling of an experts module holding a
    2-D ``weight`` with one row per expert, or the module holding it inside a sibling named or classed
    as a router or gate (AFMoE's ``router.gate``, LongCat's ``router.classifier``, Hunyuan's ``gate.wg``)."""
    found = set()
    for parent in model.modules():
        children = list(parent.named_children())
        for _, experts in children:
            n = getattr(experts, "num_experts", None)
            if not expert_params(experts):
                continue
            for name, other in children:
                if other is experts:
                    continue
                routing = ROUTING.search(name) or ROUTING.search(type(other).__name__)
                for sub in (other.modules() if routing else (other,)):
                    w = sub._parameters.get("weight")
                    if w is not None and w.ndim == 2 and w.shape[0] == n:
                        found.add(id(sub))
    return found


ROUTING = re.compile(r"router|gate$|Router|Gate$")


def adapter_modules(model) -> set[int]:
    """ids of the modules a PEFT adapter added (LoRA's ``lora_A``/``lora_B`` and what they hold): trained
    float beside the model's layers, never weights of the model to quantize."""
    found = set()
    for m in model.modules():
        for attr in getattr(m, "adapter_layer_names", ()):  # peft's tuner layers name their adapter parts
            part = getattr(m, attr, None)
            if part is not None and hasattr(part, "modules"):
                found.update(id(x) for x in part.modules())
    return found


def all_targets(model) -> list[Target]:
    """Every weight of a kind qcompare knows, in module order, nothing skipped (a LoRA layer's adapters
    are not the model's weights: its ``base_layer`` is)."""
    from torch import nn

    conv1d = _conv1d_class()
    routers = router_modules(model)
    adapters = adapter_modules(model)
    found = []
    for name, m in model.named_modules():
        if id(m) in adapters:
            continue
        if id(m) in routers:
            found.append(Target(name, m, "router"))
        elif isinstance(m, nn.Linear):
            found.append(Target(name, m, "linear"))
        elif conv1d is not None and isinstance(m, conv1d):
            found.append(Target(name, m, "conv1d"))
        elif isinstance(m, nn.Embedding):
            found.append(Target(name, m, "embedding"))
        else:
            found += [Target(name, m, "experts", p) for p in expert_params(m)]
    return found


def find_targets(model, skip: Iterable[str] = (), kinds: Iterable[str] = ("linear",)) -> list[Target]:
    """The weights of ``kinds`` in ``model`` that no ``skip`` pattern names, in module order.

    A weight shared by two modules (tied embeddings and head) is one target, found at its
    first module."""
    kinds, skip = tuple(kinds), tuple(skip)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown target kinds {unknown}; allowed: {', '.join(KINDS)}")
    seen, out = [], []
    for t in all_targets(model):
        stored = stored_parameter(t.module, t.param)
        if t.kind in kinds and not skipped(t, skip) and not any(stored is s for s in seen):
            seen.append(stored)
            out.append(t)
    return out


def stored_parameter(module, param: str):
    """The tensor a module stores for ``param`` (under a torch parametrization, its original:
    reading ``module.weight`` there computes a new tensor each time)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and param in parametrizations:
        return parametrizations[param].original
    return module._parameters.get(param, getattr(module, param, None))


def unmatched(model, skip: Iterable[str]) -> list[str]:
    """The skip patterns that name no module or parameter of ``model`` (likely typos)."""
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    return [p for p in skip if not any(matches(n, p) for n in names)]


def skip_patterns(names: Iterable[str], model=None) -> str:
    """The ``skip`` patterns that leave the modules ``names`` float, quoted as a recipe writes them: for each,
    the shortest name suffix (``*.dt_proj``: every layer's) that names only modules of ``names`` or like it —
    the same class under a parent of the same class, found in ``model`` — so GPT-2's ``attn.c_proj`` becomes
    ``*.attn.c_proj`` and leaves ``mlp.c_proj`` quantized. Without ``model``: the last name part."""
    modules = dict(model.named_modules()) if model is not None else {}
    names = list(names)
    named = set(names)

    def kind(name):
        return type(modules.get(name)).__name__, type(modules.get(name.rpartition(".")[0])).__name__

    def pattern(name):
        parts = name.split(".")
        if name not in modules:
            return f"*.{parts[-1]}" if len(parts) > 1 else name
        for k in range(1, len(parts)):
            suffix = ".".join(parts[-k:])
            if all(m in named or kind(m) == kind(name) for m in modules if m.endswith("." + suffix)):
                return f"*.{suffix}"
        return name

    return ", ".join(f'"{p}"' for p in dict.fromkeys(pattern(n) for n in names))


def describe(kinds: Iterable[str]) -> str:
    words = {"linear": "Linear layers", "conv1d": "Conv1D layers", "embedding": "embeddings",
             "experts": "3-D expert weights", "router": "expert routers"}
    return ", ".join(words[k] for k in kinds)


def probe_expert_layouts(model) -> dict[str, bool]:
    """Whether each fused experts module multiplies its inputs by its 3-D weights as (experts, in, out),
    observed (``observe_expert_layouts``), and each module given transformers' own ``is_transposed`` flag
    as observed (a family that stores (experts, in, out) without saying so, Llama 4's, would otherwise get
    its groups along the output); returns {module name: transposed} for the modules the probe saw."""
    out = observe_expert_layouts(model)
    for name, transposed in out.items():
        module = model.get_submodule(name)
        if getattr(module, "is_transposed", False) != transposed:
            module.is_transposed = transposed
    return out


def observe_expert_layouts(model) -> dict[str, bool]:
    """{fused experts module's name: whether it multiplies its inputs by its 3-D weights as (experts,
    in, out)}, observed, not read from a flag: one forward pass on a few probe tokens watches every
    matrix product that takes a slice of an experts weight and finds which of the weight's axes it
    contracts with the input. Modules the probe did not see, or saw used both ways, are left out."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    weights = {}  # storage address -> (module name, parameter)
    for name, module in model.named_modules():
        for attr in expert_params(module):
            p = module._parameters[attr]
            weights[p.untyped_storage().data_ptr()] = (name, p)
    if not weights:
        return {}
    seen: dict[str, set[int]] = {}

    def axis(view, dim: int, p) -> int | None:
        """The axis of ``p`` that dimension ``dim`` of its view ``view`` runs along."""
        hits = [a for a in (1, 2) if p.stride(a) == view.stride(dim) and p.shape[a] == view.shape[dim]]
        return hits[0] if len(hits) == 1 else None

    def note(t, dim):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.ndim < 2:
            return
        found = weights.get(t.untyped_storage().data_ptr())
        if found is not None:
            a = axis(t, dim % t.ndim, found[1])
            if a is not None:
                seen.setdefault(found[0], set()).add(a)

    # the products an experts forward uses: its eager loop (matmul, linear), bmm, transformers' grouped_mm
    PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm,
                *([torch._grouped_mm] if hasattr(torch, "_grouped_mm") else [])}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in PRODUCTS and len(args) >= 2:
                note(args[0], -1)  # a weight on the left contracts its last axis
                note(args[1], -2)  # on the right, its second to last
            elif func is F.linear and len(args) >= 2:
                note(args[1], -1)  # linear(x, W) contracts W's last axis
            return func(*args, **kwargs)

    vocab = model.get_input_embeddings().num_embeddings
    device = next(p.device for p in model.parameters())
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), Watch():
            model(ids)
    except Exception:  # noqa: BLE001 - a model the probe cannot run keeps its flags
        return {}
    finally:
        model.train(training)
    return {name: axes.pop() == 1 for name, axes in seen.items() if len(axes) == 1}
