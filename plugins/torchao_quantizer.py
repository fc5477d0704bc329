"""torchao quantization-aware training: a fake-quant student, then real low-bit weights.

``prepare`` swaps Linear layers for torchao's ``FakeQuantizedLinear`` (QATConfig, step
"prepare"); ``convert`` applies the matching post-training config (QATConfig, step
"convert"). The student's forward pass and the converted model's agree exactly (packing
"unpacked") or to bfloat16 rounding (packing "tinygemm"): ``tests/test_torchao_quantizer.py``
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

import fnmatch
import warnings
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from torch import nn

from qcompare import hookimpl
from qcompare.api import Params, Quantizer
from qcompare.errors import QcompareError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (0, 16, 32, 64, 128, 256, 512, 1024)
TINYGEMM_GROUP_SIZES = (32, 64, 128)


def _bits_message(bits) -> str:
    return f"torchao: unsupported bits {bits!r}; allowed: {', '.join(map(str, BITS))}"


def _group_message(group_size) -> str:
    return (f"torchao: unsupported group_size {group_size!r}; allowed: 0 (per channel) or "
            f"{', '.join(map(str, GROUP_SIZES[1:]))}")


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


def _granularity(group_size: int):
    from torchao.quantization import PerAxis, PerGroup

    return PerAxis(0) if group_size == 0 else PerGroup(group_size)


def _fake_quantizer_classes():
    """Fake quantizers that use the converter's qparam choice (see the module docstring).

    Built on first use: importing torchao takes seconds, and listing plugins should not."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.qat.utils import _fake_quantize_per_channel_group
    from torchao.quantization.quant_primitives import (
        _DTYPE_TO_QVALUE_BOUNDS,
        MappingType,
        ZeroPointDomain,
        _choose_qparams_affine_tinygemm,
        _fake_quantize_affine,
        choose_qparams_affine,
    )

    class AffineFakeQuantizer(IntxFakeQuantizer):
        """Asymmetric weights on IntxUnpackedToInt8Tensor.from_hp's grid (signed range, int zero point)."""

        def _per_channel_or_group_forward(self, x):
            if self.config.is_symmetric:  # torchao's own symmetric path already matches
                return super()._per_channel_or_group_forward(x)
            group_size = getattr(self.config.granularity, "group_size", x.shape[-1])
            qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[self.config.dtype]
            scale, zero_point = choose_qparams_affine(
                x, MappingType.ASYMMETRIC, (1, group_size), target_dtype=torch.int8, quant_min=qmin,
                quant_max=qmax, scale_dtype=self.config.scale_precision, zero_point_dtype=torch.int8)
            return _fake_quantize_per_channel_group(x, scale, zero_point, qmin, qmax, group_size)

    class TinygemmFakeQuantizer(IntxFakeQuantizer):
        """int4 on the tinygemm grid: unsigned 0..15, float zero point, bfloat16 scales."""

        def _per_channel_or_group_forward(self, x):
            block = (1, self.config.granularity.group_size)
            scale, zero_point = _choose_qparams_affine_tinygemm(
                x, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, None, x.dtype)
            return _fake_quantize_affine(x, block, scale, zero_point, torch.int32, 0, 15, ZeroPointDomain.FLOAT)

    return AffineFakeQuantizer, TinygemmFakeQuantizer


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def _targets(model: nn.Module, params: TorchaoParams):
    """(name, module) of the Linear layers (and embeddings) to quantize; checks the shapes."""
    names = [n for n, _ in model.named_modules()]
    for pattern in params.skip:
        if not any(_matches(n, pattern) for n in names):
            warnings.warn(f"torchao: skip pattern {pattern!r} matches no module of the model", stacklevel=3)
    skipped = lambda n: any(_matches(n, p) for p in params.skip)  # noqa: E731
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n)]
    embeddings = [(n, m) for n, m in model.named_modules()
                  if params.embeddings and isinstance(m, nn.Embedding) and not skipped(n)]
    if not linears:
        raise QcompareError("torchao: the model has no Linear layers to quantize (after skip "
                            f"{params.skip}); allowed: models with nn.Linear layers")
    g = params.group_size
    for name, m in linears:
        if g and m.in_features % g:
            raise QcompareError(f"torchao: group_size {g} does not divide {name}.in_features={m.in_features}; "
                                "use a group size that divides it, or 0 (per channel)")
    for name, m in embeddings:
        if g and m.embedding_dim % g:
            raise QcompareError(f"torchao: group_size {g} does not divide {name}.embedding_dim={m.embedding_dim}; "
                                "use a group size that divides it, or 0 (per channel)")
    return linears, embeddings


def _check(params) -> None:
    """Params built with model_construct skip validation; the runner's never do, tests might."""
    if params.bits not in BITS:
        raise QcompareError(_bits_message(params.bits))
    if params.group_size not in GROUP_SIZES:
        raise QcompareError(_group_message(params.group_size))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _weight_only_config(params: TorchaoParams):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType

    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{params.bits}"), granularity=_granularity(params.group_size),
        mapping_type=MappingType.SYMMETRIC if params.symmetric else MappingType.ASYMMETRIC)


def _linear_convert_config(params: TorchaoParams, device: torch.device):
    """The post-training config whose numerics the student's fake quantization reproduces."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, MappingType

    if params.packing == "tinygemm":
        if device.type == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=params.group_size, set_inductor_config=False)
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=params.group_size, int4_packing_format="tile_packed_to_4d",
                                        set_inductor_config=False)
        raise QcompareError(f"torchao: packing 'tinygemm' cannot run on {device}; it runs on CPU or on a "
                            "CUDA GPU of compute capability 8.0 or newer; use packing='unpacked' here")
    if params.activations == "int8":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, f"int{params.bits}"), weight_granularity=_granularity(params.group_size),
            weight_mapping_type=MappingType.SYMMETRIC if params.symmetric else MappingType.ASYMMETRIC)
    return _weight_only_config(params)


def _unfake(model) -> tuple[set[int], set[int]]:
    """Swap torchao's fake-quantized Linear/Embedding layers back to plain ones over the same
    weights, as its QAT convert step does (``to_linear``/``to_embedding``), but without first
    building a throwaway layer: those allocate and randomly initialise a weight of the layer's
    size (Qwen3-4B's 778 MB embedding among them) only to drop it. Returns the new modules' ids."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    linears, embeddings = set(), set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                with torch.device("meta"):
                    plain = nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                      dtype=child.weight.dtype)
                plain.weight, plain.bias = child.weight, child.bias
                linears.add(id(plain))
            elif isinstance(child, FakeQuantizedEmbedding):
                with torch.device("meta"):
                    plain = nn.Embedding(child.num_embeddings, child.embedding_dim, child.padding_idx, child.max_norm,
                                         child.norm_type, child.scale_grad_by_freq, child.sparse,
                                         dtype=child.weight.dtype)
                plain.weight = child.weight
                embeddings.add(id(plain))
            else:
                continue
            setattr(parent, name, plain)
    return linears, embeddings


class TorchaoQuantizer(Quantizer):
    """torchao QAT: fake-quant student (intx weights, optional int8 activations), converted to real int weights."""

    name = "torchao"
    Params = TorchaoParams
    shares_teacher_weights = True  # prepare swaps modules over the same Parameters; convert builds new tensors

    def prepare(self, model, params, context):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

        _check(params)
        linears, embeddings = _targets(model, params)
        if params.packing == "tinygemm":
            model.to(torch.bfloat16)  # the int4 kernels take bfloat16 only; the student must see their numerics
        dtype = _dtype(model)
        weight = IntxFakeQuantizeConfig(
            getattr(torch, f"int{params.bits}"), granularity=_granularity(params.group_size),
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
        affine, tinygemm = _fake_quantizer_classes()
        for m in model.modules():
            if isinstance(m, FakeQuantizedLinear) and params.packing == "tinygemm":
                m.weight_fake_quantizer = tinygemm(m.weight_fake_quantizer.config)
            elif isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)):
                m.weight_fake_quantizer = affine(m.weight_fake_quantizer.config)
        return model

    def convert(self, student, params, context):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear

        _check(params)
        if not any(isinstance(m, FakeQuantizedLinear) for m in student.modules()):
            raise QcompareError("torchao: convert needs a student made by torchao's prepare; "
                                "this model has no fake-quantized Linear layers")
        device = next(student.parameters()).device
        with torch.no_grad():
            # QATConfig(step="convert") is this swap followed by the base config's transform
            linears, embeddings = _unfake(student)
            quantize_(student, _linear_convert_config(params, device), filter_fn=lambda m, fqn: id(m) in linears)
            if embeddings:
                quantize_(student, _weight_only_config(params), filter_fn=lambda m, fqn: id(m) in embeddings)
        return student.eval()

    def save(self, model, params, folder, context):
        """A safetensors folder through transformers' torchao integration: ``config.json`` carries a
        ``TorchAoConfig`` of the converter's config, so ``from_pretrained`` rebuilds the same tensors
        (measured: identical logits for every unpacked variant)."""
        from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
        from transformers import TorchAoConfig
        from transformers.quantizers.auto import AutoHfQuantizer

        kinds = {type(t).__name__ for t in model.state_dict().values()} - {"Tensor", "Parameter"}
        unsupported = sorted(kinds - set(ALLOWED_TENSORS_SUBCLASSES))
        if unsupported:
            raise QcompareError(f"torchao: cannot save {', '.join(unsupported)} weights (packing "
                                f"{params.packing!r} on {next(model.parameters()).device.type}); transformers can "
                                f"serialize {', '.join(ALLOWED_TENSORS_SUBCLASSES)}; use packing='unpacked'")
        device = next(model.parameters()).device
        config = TorchAoConfig(_linear_convert_config(params, device), modules_to_not_convert=list(params.skip),
                               include_input_output_embeddings=params.embeddings)
        # save_pretrained flattens torchao tensors only when the model carries an HfQuantizer,
        # which from_pretrained would have attached; set both for the save, then put them back.
        before = (getattr(model.config, "quantization_config", None), getattr(model, "hf_quantizer", None))
        model.config.quantization_config = config
        model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
        try:
            model.save_pretrained(folder)
        finally:
            model.config.quantization_config, model.hf_quantizer = before
            if before[0] is None:
                del model.config.quantization_config

    def bits_per_weight(self, params) -> float:
        """Nominal bits of the format: the code, a 16-bit scale per group and, if asymmetric, a zero
        point per group (int8 unpacked, bf16 tinygemm). Per channel counts no overhead: the row
        length is unknown here and the overhead is 16/in_features. The unpacked layout holds each
        code in a full byte in memory; ``storage_bytes`` reports that."""
        if not params.group_size:
            return float(params.bits)
        zero_point = 0 if params.symmetric else (16 if params.packing == "tinygemm" else 8)
        return params.bits + (16 + zero_point) / params.group_size

    def storage_bytes(self, model) -> int:
        """Bytes held in memory: torchao tensors count their codes, scales and zero points."""
        from torchao.utils import TorchAOBaseTensor

        total, seen = 0, set()
        for t in model.state_dict(keep_vars=True).values():
            if id(t) in seen:  # tied weights (e.g. gemma's lm_head) are stored once
                continue
            seen.add(id(t))
            if isinstance(t, TorchAOBaseTensor):
                names = list(t.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", []) or [])
                parts = [getattr(t, n, None) for n in names]
                total += sum(p.numel() * p.element_size() for p in parts if p is not None)
            else:
                total += t.numel() * t.element_size()
        return total


@hookimpl
def register_quantizers(register):
    register(TorchaoQuantizer)
