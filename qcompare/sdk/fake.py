"""The training-time student's contract: how distillers find and switch a quantizer's rounding.

A quantizer's ``prepare`` returns a student whose rounded weights pass through fake quantizers:

- a **fake quantizer** is a module whose ``forward(w)`` returns ``w`` on the quantizer's grid (the
  gradient passes straight through to the float weight), and whose ``enabled`` set to False makes
  it the identity — the student then computes its float teacher (weight sharing, GKD's teacher
  mode). It is a ``FakeQuantizer``: a subclass, a class registered with ``FakeQuantizer.register(cls)``,
  or one of torchao's (a ``torchao.quantization.qat`` ``FakeQuantizerBase``, which keeps this
  contract), whoever made it; ``torch.ao.quantization.FakeQuantize`` is not one.
- a module whose weights are rounded names its quantizers where distillers look for them: the
  attribute ``weight_fake_quantizer`` rounds its ``weight``; a ``ModuleDict`` attribute
  ``weight_fake_quantizers`` rounds the parameters it is keyed by (fused experts); an attribute
  ``activation_fake_quantizer`` rounds its inputs. torchao's fake-quantized layers follow it.
- a module whose quantizers round a view of its weights (fused experts round rows of input
  features) says what it computes with in ``rounded_weights()``, and gives
  ``drop_fake_quantizers()``: back to its own class, the weights it holds left as they are.

Distillers rely on nothing else: rounding each weight once per rollout (``weight_quantizers``,
``rounded_weights``), compiling it, switching it off (``fake_quantizers``).
"""

from __future__ import annotations

import abc
import sys

TORCHAO_FAKE = "torchao.quantization.qat.fake_quantizer"


class FakeQuantizer(abc.ABC):  # noqa: B024 - a marker: the contract is forward(w) and ``enabled``
    """A module that rounds a tensor onto the quantizer's grid in forward, straight-through in backward;
    ``enabled = False`` makes it the identity."""

    enabled: bool

    @classmethod
    def __subclasshook__(cls, other):
        # torchao's fake quantizers, without importing torchao: none exists before torchao is imported
        torchao = sys.modules.get(TORCHAO_FAKE)
        if cls is FakeQuantizer and torchao is not None and issubclass(other, torchao.FakeQuantizerBase):
            return True
        return NotImplemented


def is_fake_quantizer(module) -> bool:
    return isinstance(module, FakeQuantizer)


def fake_quantizers(model) -> list:
    """Every fake quantizer in the model that can be switched off (weights' and inputs')."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizer) and hasattr(m, "enabled")]


def weight_quantizers(module) -> dict[str, FakeQuantizer]:
    """{name of one of this module's own parameters: the fake quantizer that rounds it}."""
    out = {}
    single = getattr(module, "weight_fake_quantizer", None)
    if isinstance(single, FakeQuantizer):
        out["weight"] = single
    several = getattr(module, "weight_fake_quantizers", None)
    if several is not None and hasattr(several, "items"):
        out.update({name: q for name, q in several.items() if isinstance(q, FakeQuantizer)})
    return out


def rounded_weights(host) -> dict:
    """{parameter name: the weight ``host`` computes with, as its own forward rounds it}."""
    if hasattr(host, "rounded_weights"):
        return host.rounded_weights()
    return {name: q(host._parameters[name]) for name, q in weight_quantizers(host).items()}


def activation_quantizer(module):
    """The fake quantizer that rounds this module's inputs, if any."""
    q = getattr(module, "activation_fake_quantizer", None)
    return q if isinstance(q, FakeQuantizer) else None
