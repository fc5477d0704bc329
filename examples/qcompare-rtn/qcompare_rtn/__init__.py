"""Round-to-nearest weight quantization in plain torch: a worked example of a qcompare plugin.

The student keeps float latent weights and rounds them on the fly with a straight-through
estimator, so any distiller can train it; ``convert`` stores int8 codes plus one scale per
group, and dequantizes in ``forward`` exactly as the student did.

This module is what qcompare imports to list plugins and validate recipes, so it imports no
torch: the work is in ``qcompare_rtn.grids``, imported by the methods that need it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qcompare.sdk import hookimpl, Params, Quantizer


class RTNParams(Params):
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: int = Field(32, gt=0, description="weights sharing one scale, along the input features")
    skip: list[str] = Field(["lm_head"], description="modules left in float: a glob, a name suffix or 're:<regex>'")


class RTNQuantizer(Quantizer):
    """Symmetric round-to-nearest per-group weight quantization in plain torch."""

    name = "rtn"
    Params = RTNParams

    def prepare(self, model, params, context):
        from . import grids

        return grids.prepare(model, params)

    def convert(self, student, params, context):
        from . import grids

        return grids.convert(student, params)

    def save(self, model, params, folder, context):
        """A compressed-tensors checkpoint (packed codes and scales, what vLLM serves) that
        ``AutoModelForCausalLM.from_pretrained`` loads to the same logits: the default
        ``save_pretrained`` would write buffers transformers does not know, and the reloaded
        model would hold freshly initialised Linear layers instead."""
        from . import grids

        grids.save(model, params, folder)

    def bits_per_weight(self, params):
        return params.bits + 32 / params.group_size  # one fp32 scale per group

    def code_bits(self, params):
        return params.bits  # held one per int8 here; a packed format would store them at this width

    def input_groups(self, params):
        return 2 ** params.bits, params.group_size  # the runner checks the groups run along the input features


@hookimpl
def register_quantizers(register):
    register(RTNQuantizer)
