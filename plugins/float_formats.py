"""The low-bit float formats practitioners ship: NVFP4, MXFP4 and FP8 (torchao), NF4 and FP4
(bitsandbytes).

Each quantizer gives a trainable student whose fake quantizer rounds with the library's own
quantize → dequantize functions (the very calls its converter makes, so the two cannot drift),
straight-through gradients to the float weights; ``convert`` makes the library's real low-bit
layers; ``save`` writes what transformers reloads to the same logits (``TorchAoConfig`` /
``BitsAndBytesConfig``). The runner checks fake ≡ converted to the bit on CPU.

What runs where (torchao 0.18, bitsandbytes 0.50.2; ``docs/quantizers.md`` has the measurements):

- ``nvfp4``  weight-only NVFP4 (E2M1 codes, an FP8 E4M3 scale per 16 weights, a float32 scale
  per tensor). torchao computes it by dequantizing on every device; Blackwell GPUs (sm100) run
  NVFP4 matmuls natively only with activations quantized too, which torchao's CPU path refuses.
- ``mxfp4``  MXFP4 weights *and* activations (E2M1 codes, an E8M0 scale per 32 values): torchao
  0.18 has no forward for weight-only MXFP4 ("weight-only quant not yet supported"), so this is
  the W4A4 recipe of the OCP MX spec, emulated in bfloat16 on CPU (torchao's kernel accepts
  bfloat16 only: the student is cast to it), native on Blackwell.
- ``fp8``    weight-only FP8 (E4M3 or E5M2) with a float32 scale per row, per tensor or per
  group; dequantized on CPU, Hopper/Ada GPUs run FP8 natively.
- ``bnb``    bitsandbytes 4-bit (QLoRA's NF4, or FP4) with an absmax per block, optionally
  double-quantized (the absmaxes as 8-bit codes with a float32 scale per 256); the student's
  layers become ``Linear4bit``. On CPU the converted layers keep bitsandbytes' portable
  dequantize → matmul path (its AVX512-BF16 repack rounds activations to bfloat16 and would
  differ from the trained student by ~3e-3); ``qcompare.compat`` keeps reloads on that path too.

The formats hold Linear layers (not fused 3-D MoE experts, which only the torchao integer
quantizer quantizes, nor embeddings); ``check_model`` refuses what a format cannot take with
one line, before a cell starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qcompare.sdk import hookimpl, Params, Quantizer

SKIP_FIELD = dict(description="modules left in float: a glob over full names ('*.mlp.*'), a name suffix, or "
                              "'re:<regex>'")


class NVFP4Params(Params):
    per_tensor_scale: bool = Field(
        True, description="NVFP4's second-level float32 scale per tensor (beside the FP8 scale per 16 weights); "
                          "false: block scales alone")
    skip: list[str] = Field(["lm_head"], **SKIP_FIELD)


class MXFP4Params(Params):
    skip: list[str] = Field(["lm_head"], **SKIP_FIELD)


class FP8Params(Params):
    dtype: Literal["e4m3", "e5m2"] = Field("e4m3", description="FP8 element format: e4m3 (precision) or e5m2 (range)")
    granularity: Literal["row", "tensor"] = Field("row", description="one float32 scale per output row, or per tensor")
    group_size: int = Field(0, ge=0, description="0: as granularity says; n > 1: one scale per n weights along each "
                                                 "row (granularity 'row' only)")
    skip: list[str] = Field(["lm_head"], **SKIP_FIELD)

    @model_validator(mode="after")
    def _group_of_rows(self):
        if self.group_size == 1:
            raise ValueError("fp8: group_size 1 is one scale per weight; allowed: 0 (as granularity says) or 2 and more")
        if self.group_size and self.granularity == "tensor":
            raise ValueError(f"fp8: group_size {self.group_size} splits rows, granularity 'tensor' takes whole tensors; "
                             "use granularity 'row' with a group size, or group_size 0")
        return self


class BnbParams(Params):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="nf4 (QLoRA's normal-float grid) or fp4 (E2M1)")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="weights sharing one absmax (counted over the flattened weight, as bitsandbytes does)")
    double_quant: bool = Field(
        True, description="quantize the absmaxes too (8-bit, a float32 scale per 256): QLoRA's double quantization")
    skip: list[str] = Field(["lm_head"], **SKIP_FIELD)


class FloatFormatQuantizer(Quantizer):
    """Shared by the float formats: the format object (``qcompare_plugins.float_grids``) does the work."""

    shares_teacher_weights = True  # prepare wraps the same Parameters; convert builds new tensors

    def format(self, params):
        from qcompare_plugins import float_grids

        return float_grids.FORMATS[self.name](params)

    def check_model(self, model, params) -> None:
        """The layers it would quantize exist, are Linear layers the format holds, and have the
        shapes its blocks need (what ``prepare`` checks first)."""
        self.format(params).targets(model)

    def prepare(self, model, params, context):
        return self.format(params).prepare(model)

    def convert(self, student, params, context):
        return self.format(params).convert(student)

    def save(self, model, params, folder, context):
        self.format(params).save(model, folder)

    def fake_quant_tolerance(self, params) -> float:
        """Exact: the student rounds with the converter's own functions and multiplies in the
        converted layer's own order."""
        return 0.0


class NVFP4Quantizer(FloatFormatQuantizer):
    """NVFP4 weight-only (torchao): E2M1 codes, an FP8 scale per 16 weights, a float32 scale per tensor."""

    name = "nvfp4"
    Params = NVFP4Params

    def bits_per_weight(self, params) -> float:
        """4-bit codes + an 8-bit scale per 16 (the per-tensor scale is one number per layer)."""
        return 4 + 8 / 16


class MXFP4Quantizer(FloatFormatQuantizer):
    """MXFP4 weights and activations (torchao, emulated in bfloat16 off Blackwell): E2M1 codes, an E8M0 scale per 32."""

    name = "mxfp4"
    Params = MXFP4Params

    def bits_per_weight(self, params) -> float:
        return 4 + 8 / 32

    def input_groups(self, params) -> tuple[int, int]:
        """E2M1's 16 codes, one scale per 32 input features."""
        return 16, 32


class FP8Quantizer(FloatFormatQuantizer):
    """FP8 weight-only (torchao): E4M3/E5M2 codes with a float32 scale per row, tensor or group."""

    name = "fp8"
    Params = FP8Params

    def bits_per_weight(self, params) -> float:
        """8-bit codes + a 32-bit scale per group (per row and per tensor: the row length is
        unknown here; the runner measures what the converted model holds)."""
        return 8 + (32 / params.group_size if params.group_size else 0)


class BnbQuantizer(FloatFormatQuantizer):
    """bitsandbytes 4-bit (NF4 / FP4) Linear4bit layers, optionally double-quantized absmaxes."""

    name = "bnb"
    Params = BnbParams

    def bits_per_weight(self, params) -> float:
        """4-bit codes + the absmax per block: float32, or (double quantization) an 8-bit code
        per block and a float32 scale per 256 blocks."""
        if params.double_quant:
            return 4 + 8 / params.blocksize + 32 / (params.blocksize * 256)
        return 4 + 32 / params.blocksize

    def input_groups(self, params) -> tuple[int, int]:
        """16 codes, one absmax per block of ``blocksize`` weights in row order (a block runs along the
        input features; one longer than a row covers whole rows, each checked alone)."""
        return 16, params.blocksize


@hookimpl
def register_quantizers(register):
    for cls in (NVFP4Quantizer, MXFP4Quantizer, FP8Quantizer, BnbQuantizer):
        register(cls)
