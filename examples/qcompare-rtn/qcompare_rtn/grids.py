"""The torch side of the RTN example: rounding, the trainable student, the packed layer and its
checkpoint. Imported only when a cell quantizes (``qcompare plugins`` and ``validate`` never do)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcompare.sdk import find_targets, QcompareError, save_int_grid


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group codes and scales: w ≈ codes * scale."""
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    codes = torch.clamp(torch.round(g / scale), -qmax - 1, qmax)
    return codes, scale


class _RoundThrough(torch.autograd.Function):
    """Forward: the rounded weight itself, bit for bit what ``RTNLinear`` computes from its codes.
    Backward: the gradient passes straight through. (``w + (ŵ - w).detach()`` is not ``ŵ`` in floating
    point, so a student written that way differs from its converted model in the last bits.)"""

    @staticmethod
    def forward(ctx, w, bits: int, group_size: int):
        codes, scale = quantize_groups(w, bits, group_size)
        return (codes * scale).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return _RoundThrough.apply(w, bits, group_size)


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


def targets(model: nn.Module, p) -> list[tuple[str, nn.Linear]]:
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


def prepare(model, params):
    for _, m in targets(model, params):
        parametrize.register_parametrization(m, "weight", FakeQuant(params.bits, params.group_size))
    return model


def convert(student, params):
    for name, m in targets(student, params):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        parent = student.get_submodule(name.rpartition(".")[0]) if "." in name else student
        setattr(parent, name.rpartition(".")[2], RTNLinear(m, params.bits, params.group_size))
    return student


def save(model, params, folder):
    """A compressed-tensors checkpoint (codes and scales, what vLLM serves) that
    ``AutoModelForCausalLM.from_pretrained`` loads to the same logits."""
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
