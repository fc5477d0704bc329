"""torchao's grids on weights that are not Linear layers: fused 3-D MoE expert weights and
routers, quantized where the model keeps them, computed by the model's own forward.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj`` (E, 2I, H),
``down_proj`` (E, H, I)) read by the experts module's forward (an eager loop over experts, or
grouped matmuls). torchao's QAT and its intx configs only take 2-D weights, so each expert
tensor is handled as its 2-D view (E·N, K) — rows of one expert after another, groups along the
input dimension K — which is exactly a Linear layer's grid, per expert:

- the student's experts module gets a subclass whose forward computes the fake-quantized
  weights once (torchao's fake quantizer on the view, straight-through gradients to the float
  latent weight) and runs the module's own forward with them in place of its parameters;
- the converted module keeps each weight as torchao's ``IntxUnpackedToInt8Tensor`` of the view
  (int8 codes, scales, zero points: what ``IntxWeightOnlyConfig`` makes of a Linear weight) and
  runs its own forward on the dequantized weights, so it computes bit for bit what the student
  computed (tests/study/test_architectures.py). Dequantizing costs a transient float copy of one
  layer's experts per forward.
"""

from __future__ import annotations

import torch
from torch import nn

_CLASSES: dict = {}


def _subclass(mixin, cls):
    """``cls`` with ``mixin``'s forward in front (one class per pair, so instances stay comparable)."""
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type(f"{mixin.PREFIX}{cls.__name__}", (mixin, cls), {"_qcompare_base": cls})
    return _CLASSES[(mixin, cls)]


def _base(cls):
    return getattr(cls, "_qcompare_base", cls)


def _as_rows(w, transposed: bool):
    """A 2-D or 3-D weight as rows of input features: (out, in) or (E·out, in)."""
    if w.ndim == 2:
        return w
    return (w.transpose(1, 2) if transposed else w).reshape(-1, w.shape[1] if transposed else w.shape[2])


def from_rows(rows, shape, transposed: bool):
    if len(shape) == 2:
        return rows
    if transposed:
        return rows.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    return rows.reshape(shape)


class _SwappedWeights:
    """Runs the module's own forward with computed tensors in place of some of its weights."""

    PREFIX = ""

    def computed_weights(self) -> dict:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        weights = self.computed_weights()
        saved = {name: self._parameters.get(name) for name in weights}
        self._parameters.update(weights)  # attribute lookup finds them before any buffer of that name
        try:
            return super().forward(*args, **kwargs)
        finally:
            for name, p in saved.items():
                if p is None:
                    del self._parameters[name]
                else:
                    self._parameters[name] = p


class FakeQuantizedWeights(_SwappedWeights):
    """A student module whose weights in ``weight_fake_quantizers`` are fake-quantized per row group
    (the SDK's host contract: ``rounded_weights`` and ``drop_fake_quantizers``)."""

    PREFIX = "FakeQuantized"

    def rounded_weights(self) -> dict:
        return self.computed_weights()

    def drop_fake_quantizers(self) -> None:
        """Back to the module's own class, its weights as they are (a copy that holds rounded ones)."""
        del self.weight_fake_quantizers
        self.__class__ = _base(type(self))

    def computed_weights(self) -> dict:
        transposed = getattr(self, "is_transposed", False)
        out = {}
        for name, fq in self.weight_fake_quantizers.items():
            latent = self._parameters[name]
            out[name] = from_rows(fq(_as_rows(latent, transposed)), latent.shape, transposed)
        return out


class QuantizedWeights(_SwappedWeights):
    """A converted module holding some weights as torchao int tensors of their row view."""

    PREFIX = "Quantized"

    def computed_weights(self) -> dict:
        transposed = getattr(self, "is_transposed", False)
        return {name: from_rows(self._buffers[name].dequantize(), shape, transposed)
                for name, shape in self.quantized_shapes.items()}


def prepare(module: nn.Module, names: list[str], fake_quantizer_config, fake_quantizer_cls) -> None:
    """Fake-quantize ``module``'s weights ``names`` (2-D or 3-D) in place, as a student trains them."""
    module.__class__ = _subclass(FakeQuantizedWeights, _base(type(module)))
    module.weight_fake_quantizers = nn.ModuleDict({n: fake_quantizer_cls(fake_quantizer_config) for n in names})


def convert(module: nn.Module, config) -> None:
    """Replace the fake-quantized weights of a prepared module by torchao int tensors (``config``:
    the intx weight-only config a Linear layer of the same grid is converted with)."""
    from torchao.quantization import quantize_

    transposed = getattr(module, "is_transposed", False)
    shapes = {}
    for name in list(module.weight_fake_quantizers):
        latent = module._parameters.pop(name)
        rows = _as_rows(latent.detach(), transposed)
        with torch.device("meta"):
            carrier = nn.Linear(rows.shape[1], rows.shape[0], bias=False, dtype=rows.dtype)
        carrier.weight = nn.Parameter(rows.contiguous(), requires_grad=False)
        quantize_(carrier, config)  # the grid a Linear layer with this weight would get
        module.register_buffer(name, carrier.weight.detach())
        shapes[name] = tuple(latent.shape)
    del module.weight_fake_quantizers
    module.__class__ = _subclass(QuantizedWeights, _base(type(module)))
    module.quantized_shapes = shapes


def prepared(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizedWeights)]


def quantized(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, QuantizedWeights)]
