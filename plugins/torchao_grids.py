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

from qcompare.sdk import QcompareError, check_read_in_forward, find_targets, unmatched


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
    """The weights to quantize, by kind (``qcompare.sdk.targets``): Linear layers (and Linear expert
    routers when asked), embeddings when asked, and any other module's weights — fused 3-D expert
    weights, non-Linear routers — as {module: [parameter names]}. Checks the group size."""
    for pattern in unmatched(model, params.skip):
        warnings.warn(f"torchao: skip pattern {pattern!r} matches no module of the model", stacklevel=3)
    kinds = ["linear", "experts"] + (["embedding"] if params.embeddings else []) + (["router"] if params.routers else [])
    found = find_targets(model, params.skip, kinds)
    if not any(t.kind in ("linear", "experts") for t in found):
        raise QcompareError(f"torchao: skip = {params.skip} leaves no Linear, Conv1D or 3-D expert weight of the model to "
                            "quantize; skip fewer modules")
    g = params.group_size
    for t in found:
        width = t.module.embedding_dim if t.kind == "embedding" else t.in_features
        if g and width % g:
            raise QcompareError(f"torchao: group_size {g} does not divide the input features of {t.qualified} "
                                f"({width}); use a group size that divides it, or 0 (per channel)")
    check_read_in_forward(model, [t for t in found if t.kind != "embedding"], "torchao")
    linears = [(t.name, t.module) for t in found if isinstance(t.module, nn.Linear)]
    embeddings = [(t.name, t.module) for t in found if t.kind == "embedding"]
    others: dict = {}
    for t in found:
        if t.kind in ("experts", "router") and not isinstance(t.module, nn.Linear):
            others.setdefault(t.module, []).append(t.param)
    return linears, embeddings, others


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its parameters and saved buffers in ``dtype``, as ``from_pretrained(...,
    dtype=dtype)`` builds it: buffers the model recomputes from its config (rotary ``inv_freq``)
    stay float32. ``model.to(dtype)`` would round those too, and the saved folder, reloaded,
    would compute a different function (measured: 0.05 logit on the tiny qwen3)."""
    transient = {id(b) for m in model.modules() for name, b in m._buffers.items()
                 if b is not None and name in m._non_persistent_buffers_set}
    for t in list(model.parameters()) + [b for b in model.buffers() if id(b) not in transient]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    model.config.dtype = dtype
    return model


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


# --- transformers' Conv1D (GPT-2 family) ---------------------------------------------------


def conv1d_to_linear(model: nn.Module, skip) -> list[str]:
    """Each Conv1D layer to quantize (weight stored (in, out), y = x W + b) becomes the equal
    nn.Linear (weight (out, in)), so torchao's QAT and convert handle it like any Linear layer.
    The names are kept on the model (``_qcompare_conv1d``): ``save`` writes them back in the
    model's own layout, which is what its config rebuilds on load."""
    from transformers.pytorch_utils import Conv1D

    names = [t.name for t in find_targets(model, skip, ("conv1d",)) if isinstance(t.module, Conv1D)]
    for name in names:
        m = model.get_submodule(name)
        with torch.device("meta"):
            linear = nn.Linear(m.nx, m.nf, bias=m.bias is not None, dtype=m.weight.dtype)
        linear.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
        linear.bias = m.bias
        model.set_submodule(name, linear)
    model._qcompare_conv1d = list(getattr(model, "_qcompare_conv1d", [])) + names
    return names


def linear_to_conv1d(model: nn.Module) -> nn.Module:
    """The inverse, on a converted model: a Conv1D holding the transposed int weight (the same
    codes, groups along its first axis; ``qcompare.compat`` supplies the transposes and the
    ``addmm`` Conv1D computes with)."""
    from qcompare.sdk import compat  # noqa: F401 - torchao's int tensor has no transpose of its own
    from transformers.pytorch_utils import Conv1D

    for name in getattr(model, "_qcompare_conv1d", []):
        m = model.get_submodule(name)
        with torch.device("meta"):
            conv = Conv1D(m.out_features, m.in_features)
        weight = m.weight.detach().t()
        conv.weight = nn.Parameter(weight.contiguous() if type(weight) is torch.Tensor else weight, requires_grad=False)
        conv.bias = m.bias
        model.set_submodule(name, conv)
    return model
