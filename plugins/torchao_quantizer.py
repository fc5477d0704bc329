"""torchao quantization-aware training: a fake-quant student, then real low-bit weights.

``prepare`` swaps Linear layers for torchao's ``FakeQuantizedLinear`` (QATConfig, step
"prepare"); ``convert`` applies the matching post-training config (QATConfig, step
"convert"). The student's forward pass and the converted model's agree exactly (packing
"unpacked") or to bfloat16 rounding (packing "tinygemm"): ``tests/plugins/test_torchao_quantizer.py``
checks it for every bit width, because a student trained under one grid and served under
another loses what it learned (a whole experiment of the founding study was lost to that).

Two places where torchao 0.18's own fake quantization does not reproduce its converter, and
this module swaps in a fake quantizer that calls the converter's own qparam function:
- asymmetric ``IntxFakeQuantizer`` picks tinygemm-style qparams (unsigned range, float zero
  point) but rounds with signed bounds and an integer zero point, while
  ``IntxWeightOnlyConfig`` uses ``choose_qparams_affine`` (measured: 0.09 max logit error at
  int4 g32, 0.06 even at int8);
- packed int4 (``PrototypeInt4WeightOnlyConfig`` on CPU, tinygemm on CUDA) has no fake
  quantizer at all.
Scales are kept in the model's dtype, as the converter keeps them (bfloat16 models differ
otherwise).
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from qcompare.sdk import hookimpl, Params, QcompareError, Quantizer, skip_patterns

BITS = (2, 3, 4, 8)
GROUP_SIZES = (0, 16, 32, 64, 128, 256, 512, 1024)
TINYGEMM_GROUP_SIZES = (32, 64, 128)


def _bits_message(bits) -> str:
    return f"torchao: unsupported bits {bits!r}; allowed: {', '.join(map(str, BITS))}"


def _group_message(group_size) -> str:
    return (f"torchao: unsupported group_size {group_size!r}; allowed: 0 (per channel) or "
            f"{', '.join(map(str, GROUP_SIZES[1:]))}")


def check(params) -> None:
    """Params built with model_construct skip validation; the runner's never do, tests might."""
    if params.bits not in BITS:
        raise QcompareError(_bits_message(params.bits))
    if params.group_size not in GROUP_SIZES:
        raise QcompareError(_group_message(params.group_size))


def _known_bits(v):
    if v not in BITS:
        raise ValueError(_bits_message(v))
    return v


def _known_group_size(v):
    if v not in GROUP_SIZES:
        raise ValueError(_group_message(v))
    return v


class TorchaoParams(Params):
    # The checks sit in the field types so that recipe validation, which checks one field
    # at a time, reports them with the field's name.
    bits: Annotated[Literal[2, 3, 4, 8], BeforeValidator(_known_bits)] = Field(4, description="bits per weight code")
    group_size: Annotated[int, AfterValidator(_known_group_size)] = Field(
        32, description="weights sharing one scale along the input features; 0 = per channel (one scale per row)")
    symmetric: bool = Field(True, description="symmetric grid (no zero point); false adds a zero point per group")
    activations: Literal["none", "int8"] = Field(
        "none", description="'int8' also quantizes Linear inputs dynamically, per token, asymmetric")
    skip: list[str] = Field(
        ["lm_head"], description="modules left in float: a glob over full names ('*.mlp.*') or a name suffix")
    embeddings: bool = Field(False, description="also quantize input embeddings (weight-only, same grid)")
    routers: bool = Field(False, description="also quantize MoE routers (the gates that score experts; "
                          "float by default, as llm-compressor leaves them)")
    packing: Literal["unpacked", "tinygemm"] = Field(
        "unpacked",
        description="'unpacked': one int8 per code, any bits, exact on CPU and CUDA; 'tinygemm': two int4 "
                    "codes per byte with the CPU/CUDA int4 kernel (bits=4, symmetric=false, group 32/64/128, "
                    "activations none); the student then runs in bfloat16")

    @model_validator(mode="after")
    def _tinygemm_combination(self):
        if self.packing == "tinygemm":
            wrong = []
            if self.bits != 4:
                wrong.append(f"bits={self.bits}")
            if self.symmetric:
                wrong.append("symmetric=true")
            if self.group_size not in TINYGEMM_GROUP_SIZES:
                wrong.append(f"group_size={self.group_size}")
            if self.activations != "none":
                wrong.append(f"activations={self.activations!r}")
            if wrong:
                raise ValueError(f"torchao: packing 'tinygemm' cannot take {', '.join(wrong)}; it needs bits=4, "
                                 f"symmetric=false, group_size in {TINYGEMM_GROUP_SIZES}, activations='none'")
        return self


class TorchaoQuantizer(Quantizer):
    """torchao QAT: fake-quant student (intx weights, optional int8 activations), converted to real int weights."""

    name = "torchao"
    Params = TorchaoParams
    shares_teacher_weights = True  # prepare swaps modules over the same Parameters; convert builds new tensors

    def check_model(self, model, params) -> None:
        """The layers it would quantize exist, the group size divides each, and fused experts get a
        grid they can take (what ``prepare`` checks first)."""
        from qcompare_plugins.torchao_grids import conv1d_to_linear, targets

        check(params)
        conv1d_to_linear(model, params.skip)
        _, _, others = targets(model, params)
        _check_others(others, params)

    def prepare(self, model, params, context):
        import torch
        from torch import nn
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

        from qcompare_plugins import torchao_experts
        from qcompare_plugins.torchao_grids import (cast_weights, conv1d_to_linear, dtype_of,
                                                    fake_quantizer_classes, granularity, targets)

        from qcompare.sdk import probe_expert_layouts

        check(params)
        conv1d_to_linear(model, params.skip)  # GPT-2's Conv1D layers: Linear layers while trained and converted
        probe_expert_layouts(model)  # fused experts' input axis as their forward uses them, groups along it
        linears, embeddings, others = targets(model, params)
        _check_others(others, params)
        if params.packing == "tinygemm":
            cast_weights(model, torch.bfloat16)  # the int4 kernels take bfloat16 only; the student must see their numerics
        dtype = dtype_of(model)
        weight = IntxFakeQuantizeConfig(
            getattr(torch, f"int{params.bits}"), granularity=granularity(params.group_size),
            is_symmetric=params.symmetric, scale_precision=dtype)
        activation = None
        if params.activations == "int8":
            activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, scale_precision=dtype)
        chosen = {id(m) for _, m in linears + embeddings}
        quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
                  filter_fn=lambda m, fqn: id(m) in chosen and isinstance(m, nn.Linear))
        if embeddings:
            quantize_(model, QATConfig(weight_config=weight, step="prepare"),
                      filter_fn=lambda m, fqn: id(m) in chosen and isinstance(m, nn.Embedding))
        affine, tinygemm = fake_quantizer_classes()
        for m in model.modules():
            if isinstance(m, FakeQuantizedLinear) and params.packing == "tinygemm":
                m.weight_fake_quantizer = tinygemm(m.weight_fake_quantizer.config)
            elif isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)):
                m.weight_fake_quantizer = affine(m.weight_fake_quantizer.config)
        for module, names in others.items():  # fused experts, routers: the same grid, row by row
            torchao_experts.prepare(module, names, weight, affine)
        return model

    def convert(self, student, params, context):
        import torch
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear

        from qcompare.sdk import compat  # noqa: F401 - int weights that modeling code multiplies outside F.linear
        from qcompare_plugins import torchao_experts
        from qcompare_plugins.torchao_grids import linear_convert_config, unfake, weight_only_config

        check(params)
        if not any(isinstance(m, FakeQuantizedLinear) for m in student.modules()) and \
                not torchao_experts.prepared(student):
            raise QcompareError("torchao: convert needs a student made by torchao's prepare; "
                                "this model has no fake-quantized Linear layers")
        device = next(student.parameters()).device
        with torch.no_grad():
            # QATConfig(step="convert") is this swap followed by the base config's transform
            linears, embeddings = unfake(student)
            quantize_(student, linear_convert_config(params, device), filter_fn=lambda m, fqn: id(m) in linears)
            if embeddings:
                quantize_(student, weight_only_config(params), filter_fn=lambda m, fqn: id(m) in embeddings)
            for module in torchao_experts.prepared(student):
                torchao_experts.convert(module, weight_only_config(params))
        return student.eval()

    def save(self, model, params, folder, context):
        """A safetensors folder through transformers' torchao integration: ``config.json`` carries a
        ``TorchAoConfig`` of the converter's config, so ``from_pretrained`` rebuilds the same tensors
        (measured: identical logits for every unpacked variant)."""
        from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
        from transformers import TorchAoConfig

        from qcompare.sdk import save_quantized
        from qcompare_plugins.torchao_experts import quantized
        from qcompare_plugins.torchao_grids import linear_convert_config

        if quantized(model):
            return self._save_compressed(model, params, folder)
        if getattr(model, "_qcompare_conv1d", None):  # back to the model's own Conv1D layout, as its config loads
            from qcompare_plugins.torchao_grids import linear_to_conv1d

            model = linear_to_conv1d(copy.deepcopy(model))
        kinds = {type(t).__name__ for t in model.state_dict().values()} - {"Tensor", "Parameter"}
        unsupported = sorted(kinds - set(ALLOWED_TENSORS_SUBCLASSES))
        if unsupported:
            raise QcompareError(f"torchao: cannot save {', '.join(unsupported)} weights (packing "
                                f"{params.packing!r} on {next(model.parameters()).device.type}); transformers can "
                                f"serialize {', '.join(ALLOWED_TENSORS_SUBCLASSES)}; use packing='unpacked'")
        device = next(model.parameters()).device
        config = TorchAoConfig(linear_convert_config(params, device), modules_to_not_convert=list(params.skip),
                               include_input_output_embeddings=params.embeddings)
        save_quantized(model, config, folder)

    def _save_compressed(self, model, params, folder) -> None:
        """A model with quantized fused experts: transformers' torchao integration cannot hold 3-D
        int weights, so it is written as compressed-tensors (the experts split per expert, as
        llm-compressor's MoE checkpoints are), which reloads to the same values."""
        from torch import nn

        from qcompare_plugins.compressed import save_compressed
        from qcompare_plugins.torchao_experts import quantized

        if params.embeddings or params.routers:
            raise QcompareError("torchao: a model with quantized MoE experts is saved as compressed-tensors, which "
                                "holds Linear layers and experts only; set embeddings = false and routers = false "
                                "to export it")
        odd = [m for m in quantized(model) if not isinstance(m, nn.Linear)
               and not m.quantized_shapes.keys() <= {"gate_up_proj", "down_proj", "up_proj"}]
        if odd:  # JetMoE's experts are input_linear.weight and output_linear.weight
            names = {id(m): n for n, m in model.named_modules()}
            first = f"{names[id(odd[0])]}.{sorted(odd[0].quantized_shapes)[0]}"
            raise QcompareError(
                f"torchao: {type(odd[0]).__name__.removeprefix('Quantized')} keeps its experts as {first}, and a "
                "compressed-tensors export names experts gate_up_proj, up_proj and down_proj, the only ones "
                "transformers' loader fuses back: its folder would reload with other experts; evaluate it without "
                f"saving, or leave them float with skip = [\"lm_head\", "
                f"{skip_patterns((names[id(m)] for m in odd), model)}]")
        save_compressed(model, folder, params.bits, params.group_size, params.symmetric)

    def fake_quant_tolerance(self, params) -> float:
        """Exact for the unpacked layout (the student rounds on the converter's grid, in any dtype);
        the packed int4 kernel computes in bfloat16 in its own order: within a few bf16 ulps."""
        return 0.0 if params.packing == "unpacked" else 2e-2

    def bits_per_weight(self, params) -> float:
        """Nominal bits of the format: the code, a 16-bit scale per group and, if asymmetric, a zero
        point per group (int8 unpacked, bf16 tinygemm). Per channel counts no overhead: the row
        length is unknown here and the overhead is 16/in_features. What the converted model truly
        holds (scales in its dtype, one int8 per code in memory) is measured by the runner."""
        if not params.group_size:
            return float(params.bits)
        zero_point = 0 if params.symmetric else (16 if params.packing == "tinygemm" else 8)
        return params.bits + (16 + zero_point) / params.group_size

    def code_bits(self, params) -> int:
        """The unpacked layout holds each code in a full int8; it ships at ``bits``."""
        return params.bits

    def input_groups(self, params) -> tuple[int, int]:
        """2^bits levels, one scale (and zero point) per ``group_size`` input features or per row."""
        return 2 ** params.bits, params.group_size


def _check_others(others, params) -> None:
    if others and (params.packing != "unpacked" or params.activations != "none"):
        raise QcompareError("torchao: fused MoE experts and routers take weight-only, unpacked grids; this model has "
                            "them, so use packing='unpacked' and activations='none' (or skip them: "
                            "skip = [\"lm_head\", \"*.experts\"])")


@hookimpl
def register_quantizers(register):
    register(TorchaoQuantizer)
