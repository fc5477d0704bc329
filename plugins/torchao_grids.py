"""torchao's side of the torchao quantizer, shared with the GPTQ/AWQ quantizers (whose students
and converted models are torchao's too): grids, fake quantizers, convert configs, sizes.

Imported when a cell runs, never when plugins are listed or a recipe is validated (importing
torch and torchao takes seconds). See ``qcompare_plugins.torchao_quantizer`` for why the fake
quantizers below replace torchao's own.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qcompare.errors import QcompareError
from qcompare.targets import find_targets, unmatched
from qcompare_plugins.torchao_quantizer import BITS, GROUP_SIZES, _bits_message, _group_message


def granularity(group_size: int):
    from torchao.quantization import PerAxis, PerGroup

    return PerAxis(0) if group_size == 0 else PerGroup(group_size)


def fake_quantizer_classes():
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


def targets(model: nn.Module, params):
    """(name, module) of the Linear layers (and embeddings) to quantize; checks the shapes."""
    for pattern in unmatched(model, params.skip):
        warnings.warn(f"torchao: skip pattern {pattern!r} matches no module of the model", stacklevel=3)
    kinds = ("linear", "embedding") if params.embeddings else ("linear",)
    found = find_targets(model, params.skip, kinds)
    linears = [(t.name, t.module) for t in found if t.kind == "linear"]
    embeddings = [(t.name, t.module) for t in found if t.kind == "embedding"]
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


def check(params) -> None:
    """Params built with model_construct skip validation; the runner's never do, tests might."""
    if params.bits not in BITS:
        raise QcompareError(_bits_message(params.bits))
    if params.group_size not in GROUP_SIZES:
        raise QcompareError(_group_message(params.group_size))


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def weight_only_config(params):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType

    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{params.bits}"), granularity=granularity(params.group_size),
        mapping_type=MappingType.SYMMETRIC if params.symmetric else MappingType.ASYMMETRIC)


def linear_convert_config(params, device: torch.device):
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
            weight_dtype=getattr(torch, f"int{params.bits}"), weight_granularity=granularity(params.group_size),
            weight_mapping_type=MappingType.SYMMETRIC if params.symmetric else MappingType.ASYMMETRIC)
    return weight_only_config(params)


def unfake(model) -> tuple[set[int], set[int]]:
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
