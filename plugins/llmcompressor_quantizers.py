"""GPTQ and AWQ through vLLM's llm-compressor, handed on as a torchao fake-quant student.

``prepare`` runs llm-compressor's ``oneshot`` (``GPTQModifier``, or ``AWQModifier`` then
``QuantizationModifier``) on the teacher's copy with a sample of the recipe's training data
as calibration set, then turns every
quantized Linear into torchao's ``FakeQuantizedLinear`` whose scales and zero points are
exactly llm-compressor's, frozen. The untrained student therefore computes what the
GPTQ/AWQ model computes (to the bit), and training moves the weights on that same grid.
``convert`` returns torchao's real int-weight model, whose logits equal the student's
(``IntxWeightOnlyConfig`` with the student's scales); ``save`` writes it as a
compressed-tensors checkpoint (packed ints, the format vLLM serves; transformers reloads it to
the same logits). A LoRA student keeps float adapters, which that format cannot hold: the
checkpoint holds its quantized base, and ``qcompare.sdk.saving.save_converted`` puts the adapter
beside it as a PEFT adapter.

Why the scales stay frozen: GPTQ's error feedback and AWQ's scale search chose each
weight's code *given* those scales; the grid is the result being compared. A trained
scale (torchao "range learning") would make a different quantizer, and a trained zero
point would leave the integer grid the checkpoint format stores.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from qcompare.sdk import hookimpl, Params, Quantizer

BITS = (2, 3, 4, 8)


def _known_bits(v):
    if v not in BITS:
        raise ValueError(f"unsupported bits {v!r}; allowed: {', '.join(map(str, BITS))}")
    return v


def _real_group(v):
    if v < 0 or v == 1:
        raise ValueError(f"unsupported group_size {v!r}; allowed: 0 (per channel) or a group of 2 or more weights")
    return v


class LlmCompressorParams(Params):
    # which llm-compressor modifier calibrates (what llmcompressor_calibration dispatches on)
    method: ClassVar[str] = ""
    bits: Annotated[Literal[2, 3, 4, 8], BeforeValidator(_known_bits)] = Field(
        4, description="bits per weight code (int, weight-only); vLLM serves 4 and 8")
    group_size: Annotated[int, AfterValidator(_real_group)] = Field(
        32, description="weights sharing one scale along the input features; 0 = per channel "
                              "(32 like the torchao quantizer, so that default recipes compare one grid)")
    symmetric: bool = Field(True, description="symmetric grid (no zero point); false adds an int zero point per group")
    calibration_samples: int = Field(128, gt=0, description="training-data conversations used for calibration")
    calibration_length: int = Field(512, gt=0, description="maximum tokens per calibration conversation")
    skip: list[str] = Field(
        ["lm_head"], description="modules left in float: a glob over full names, a name suffix, or 're:<regex>'")


class GPTQParams(LlmCompressorParams):
    method: ClassVar[str] = "gptq"
    dampening_frac: float = Field(
        0.01, gt=0, lt=1, description="fraction of the Hessian's mean diagonal added to it for stability")


class AWQParams(LlmCompressorParams):
    method: ClassVar[str] = "awq"


class _LlmCompressorQuantizer(Quantizer):
    """Common ground of the GPTQ and AWQ quantizers."""

    def check_model(self, model, params) -> None:
        """Linear layers to quantize exist (no Conv1D-only family), the group size divides each, the
        fake quantizer stands for each (a probe forward, where the model has weights), llm-compressor splits
        the fused experts, and for AWQ a set of layer mappings fits the model."""
        from qcompare_plugins.llmcompressor_awq import awq_mappings
        from qcompare_plugins.llmcompressor_calibration import skipped_linears

        skipped_linears(model, params, self.name)
        if isinstance(params, AWQParams):
            awq_mappings(model, self.name)

    def calibrate(self, model, params, context):
        """Run llm-compressor's oneshot on ``model`` in place; return the compressed-tensors model."""
        from qcompare_plugins.llmcompressor_calibration import calibrate

        return calibrate(model, params, context, self.name)

    def prepare(self, model, params, context):
        from qcompare_plugins.llmcompressor_calibration import student_from_calibrated

        return student_from_calibrated(self.calibrate(model, params, context), params)

    def convert(self, student, params, context):
        from qcompare_plugins.llmcompressor_calibration import convert

        return convert(student, params, self.name)

    def save(self, model, params, folder, context):
        """A compressed-tensors checkpoint of the converted model (transformers and vLLM load it).
        A LoRA cell's adapters never reach here: qcompare.sdk.saving writes them beside the base."""
        from qcompare_plugins.llmcompressor_calibration import save_compressed

        save_compressed(model, params, folder)

    def fake_quant_tolerance(self, params) -> float:
        """Exact: the converted model keeps the student's scales and rounds on the same grid."""
        return 0.0

    def bits_per_weight(self, params) -> float:
        """The code plus a 16-bit scale per group and, if asymmetric, a zero point of the code's
        width (as compressed-tensors packs it). Per channel counts no overhead (row length unknown)."""
        if not params.group_size:
            return float(params.bits)
        return params.bits + (16 + (0 if params.symmetric else params.bits)) / params.group_size

    def code_bits(self, params) -> int:
        """Codes ship packed at ``bits`` (compressed-tensors); the torchao model holds one int8 each."""
        return params.bits

    def input_groups(self, params) -> tuple[int, int]:
        """2^bits levels, one scale (and zero point) per ``group_size`` input features or per row (GPTQ's
        groups stay in the input order: no activation ordering)."""
        return 2 ** params.bits, params.group_size


class GPTQQuantizer(_LlmCompressorQuantizer):
    """GPTQ (llm-compressor): Hessian-aware rounding on calibration data; trainable on its grid."""

    name = "gptq"
    Params = GPTQParams


class AWQQuantizer(_LlmCompressorQuantizer):
    """AWQ (llm-compressor): activation-aware channel scaling, then rounding; trainable on its grid."""

    name = "awq"
    Params = AWQParams


@hookimpl
def register_quantizers(register):
    register(GPTQQuantizer)
    register(AWQQuantizer)
