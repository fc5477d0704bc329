"""Round-to-nearest weight quantization in plain torch: a worked example of a qcompare plugin.

The student keeps float latent weights and rounds them on the fly with a straight-through
estimator, so any distiller can train it; ``convert`` stores int8 codes plus one scale per
group, and dequantizes in ``forward`` exactly as the student did.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from qcompare import hookimpl
from qcompare.api import Params, Quantizer
from qcompare.errors import QcompareError
from qcompare.saving import save_int_grid
from qcompare.targets import find_targets


class RTNParams(Params):
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: int = Field(32, gt=0, description="weights sharing one scale, along the input features")
    skip: list[str] = Field(["lm_head"], description="modules left in float: a glob, a name suffix or 're:<regex>'")


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group codes and scales: w ≈ codes * scale."""
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    codes = torch.clamp(torch.round(g / scale), -qmax - 1, qmax)
    return codes, scale


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    codes, scale = quantize_groups(w, bits, group_size)
    wq = (codes * scale).reshape(w.shape)
    return w + (wq - w).detach()  # straight-through: forward rounds, backward passes through


class FakeQuant(nn.Module):
    def __init__(self, bits: int, group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, w):
        return fake_quantize(w, self.bits, self.group_size)


class RTNLinear(nn.Module):
    """A Linear whose weight is stored as int8 codes and per-group scales."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__()
        codes, scale = quantize_groups(linear.weight.detach(), bits, group_size)
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.shape = linear.weight.shape

    def forward(self, x):
        w = (self.codes.to(self.scale.dtype) * self.scale).reshape(self.shape)
        return nn.functional.linear(x, w, self.bias)


def _targets(model: nn.Module, p: RTNParams) -> list[tuple[str, nn.Linear]]:
    experts = find_targets(model, p.skip, kinds=("experts",))
    if experts:  # refuse what we do not quantize, rather than leave most of the model float
        raise QcompareError(f"rtn: quantizes Linear layers only, and this model keeps 3-D expert weights "
                            f"({experts[0].qualified}, ...); skip them or use a quantizer that handles experts")
    # qcompare's own target finder: the same skip grammar as the built-in quantizers
    found = [(t.name, t.module) for t in find_targets(model, p.skip, kinds=("linear",))]
    if not found:
        raise QcompareError("rtn: the model has no Linear layers to quantize (after skip)")
    for name, m in found:
        if m.in_features % p.group_size:
            raise QcompareError(f"rtn: group_size {p.group_size} does not divide {name}.in_features={m.in_features}")
    return found


class RTNQuantizer(Quantizer):
    """Symmetric round-to-nearest per-group weight quantization in plain torch."""

    name = "rtn"
    Params = RTNParams

    def prepare(self, model, params, context):
        for _, m in _targets(model, params):
            parametrize.register_parametrization(m, "weight", FakeQuant(params.bits, params.group_size))
        return model

    def convert(self, student, params, context):
        for name, m in _targets(student, params):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            parent = student.get_submodule(name.rpartition(".")[0]) if "." in name else student
            setattr(parent, name.rpartition(".")[2], RTNLinear(m, params.bits, params.group_size))
        return student

    def save(self, model, params, folder, context):
        """A compressed-tensors checkpoint (packed codes and scales, what vLLM serves) that
        ``AutoModelForCausalLM.from_pretrained`` loads to the same logits: the default
        ``save_pretrained`` would write buffers transformers does not know, and the reloaded
        model would hold freshly initialised Linear layers instead."""
        import copy

        plain, grids = copy.deepcopy(model), {}
        for name, m in list(plain.named_modules()):
            if isinstance(m, RTNLinear):
                linear = nn.Linear(m.shape[1], m.shape[0], bias=m.bias is not None, dtype=m.scale.dtype)
                with torch.no_grad():
                    linear.weight.copy_((m.codes.to(m.scale.dtype) * m.scale).reshape(m.shape))
                linear.bias = m.bias
                plain.set_submodule(name, linear)
                grids[name] = (m.scale.squeeze(-1), torch.zeros_like(m.scale.squeeze(-1)))
        save_int_grid(plain, folder, grids, params.bits, params.group_size, symmetric=True)

    def bits_per_weight(self, params):
        return params.bits + 32 / params.group_size  # one fp32 scale per group

    def code_bits(self, params):
        return params.bits  # held one per int8 here; a packed format would store them at this width


@hookimpl
def register_quantizers(register):
    register(RTNQuantizer)
