"""The torch side of NF3: the levels, packing, the trainable student, the packed layer, and the
format on disk. Imported only when a cell quantizes, saves or loads (``qcompare plugins`` and
``validate``'s schema checks never do)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcompare.sdk import find_targets, load_state, QcompareError, save_state


def _levels() -> list[float]:
    """The 8 normal-float levels in [-1, 1], built as NF4's 16 are (Dettmers et al., 2023): equal-probability
    quantiles of a standard normal, 4 above zero, 3 below, and zero itself exactly."""
    offset, ppf = 0.9677083, NormalDist().inv_cdf

    def spaced(n):  # n quantile levels from offset down to (excluding) the median
        return [ppf(offset + (0.5 - offset) * i / n) for i in range(n)]

    values = sorted([*spaced(4), 0.0, *(-v for v in spaced(3))])
    return [v / max(abs(x) for x in values) for v in values]


LEVELS = torch.tensor(_levels(), dtype=torch.float64)
MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2
SCALE_DTYPE = torch.float16


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..7 as int64 of w's shape, float16 scales (out, in / group_size)): w ≈ LEVELS[codes] * scale."""
    g = w.detach().reshape(w.shape[0], -1, group_size)
    # the scale as stored (float16), kept clear of its zero and infinity
    scale = g.abs().amax(-1).clamp(min=2 ** -14, max=65504).to(SCALE_DTYPE)
    x = g / scale.to(w.dtype).unsqueeze(-1)
    codes = torch.bucketize(x, MIDPOINTS.to(w.dtype))  # the nearest level
    return codes.reshape(w.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``: the same operations, in the same dtype, for the student and the packed layer."""
    out, n = codes.shape
    w = LEVELS.to(dtype)[codes].reshape(out, scale.shape[1], -1) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(out, n)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..7 → (out, in * 3 / 8) uint8: each 8 codes make one 24-bit word, little-endian."""
    out, n = codes.shape
    c = codes.to(torch.int32).reshape(out, n // 8, 8)
    word = (c << (3 * torch.arange(8, dtype=torch.int32))).sum(-1)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).to(torch.uint8).reshape(out, n // 8 * 3)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    out = packed.shape[0]
    b = packed.reshape(out, -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return ((word.unsqueeze(-1) >> (3 * torch.arange(8, dtype=torch.int32))) & 7).reshape(out, -1).long()


class _RoundThrough(torch.autograd.Function):
    """Forward: the rounded weight itself, bit for bit what ``NF3Linear`` computes from its codes.
    Backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx, w, group_size: int):
        codes, scale = quantize(w, group_size)
        return dequantize(codes, scale, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuant(nn.Module):
    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    def forward(self, w):
        return _RoundThrough.apply(w, self.group_size)


class NF3Linear(nn.Module):
    """A Linear whose weight is stored as packed 3-bit codes and float16 scales, dequantized in forward.

    It keeps no ``weight`` attribute: qcompare's coverage looks up each teacher weight where it was,
    and a float tensor found there (a convenience ``.weight`` property, say) would count as float."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.dtype = in_features, out_features, group_size, dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features * 3 // 8, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, in_features // group_size, dtype=SCALE_DTYPE))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def of(cls, linear: nn.Linear, group_size: int) -> "NF3Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, w.dtype)
        codes, scale = quantize(w, group_size)
        layer.codes, layer.scale = pack(codes), scale
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer.to(w.device)

    def forward(self, x):
        w = dequantize(unpack(self.codes), self.scale, self.dtype)
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def targets(model: nn.Module, p) -> list[tuple[str, nn.Linear]]:
    experts = find_targets(model, p.skip, kinds=("experts",))
    if experts:  # refuse what we do not quantize, rather than leave most of the model float
        raise QcompareError(f"nf3: quantizes Linear layers only, and this model keeps 3-D expert weights "
                            f"({experts[0].qualified}, ...); skip them or use a quantizer that handles experts")
    found = [(t.name, t.module) for t in find_targets(model, p.skip, kinds=("linear",))]
    if not found:
        raise QcompareError("nf3: the model has no Linear layers to quantize (after skip)")
    for name, m in found:
        if m.in_features % p.group_size:
            raise QcompareError(f"nf3: group_size {p.group_size} does not divide {name}.in_features={m.in_features}")
    return found


def prepare(model, params):
    for _, m in targets(model, params):
        parametrize.register_parametrization(m, "weight", FakeQuant(params.group_size))
    return model


def convert(student, params):
    for name, m in targets(student, params):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        student.set_submodule(name, NF3Linear.of(m, params.group_size))
    return student


def save(model, folder):
    """``config.json``, ``nf3.json`` (which layers are packed, and how) and every tensor (``save_state``)."""
    layers = {name: {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
                     "bias": m.bias is not None, "dtype": str(m.dtype).removeprefix("torch.")}
              for name, m in model.named_modules() if isinstance(m, NF3Linear)}
    save_state(model, folder)
    (Path(folder) / "nf3.json").write_text(json.dumps({"levels": _levels(), "layers": layers}, indent=1))


def load(folder):
    """The model ``save`` wrote: built from its config, each packed layer put in place, every tensor read back."""
    spec = json.loads((Path(folder) / "nf3.json").read_text())
    if spec["levels"] != _levels():
        raise QcompareError(f"{folder}: saved with other NF3 levels than this qcompare-nf3 computes")

    def put_layers(model):
        for name, s in spec["layers"].items():
            model.set_submodule(name, NF3Linear(s["in_features"], s["out_features"], s["group_size"], s["bias"],
                                                getattr(torch, s["dtype"])))

    return load_state(folder, put_layers)
