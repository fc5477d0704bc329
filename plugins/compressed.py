"""Converted models as compressed-tensors checkpoints: the format llm-compressor writes, vLLM
serves and ``AutoModelForCausalLM.from_pretrained`` loads. The GPTQ and AWQ quantizers save
this way, and so does torchao for a model whose fused MoE experts it quantized (transformers
has no other loadable form for quantized 3-D experts).

Every Linear layer holding torchao's ``IntxUnpackedToInt8Tensor`` becomes a packed group of int
codes with its scales and zero points; fused experts are first split into one Linear per expert
(llm-compressor's ``LinearExperts2D``, the layout its own MoE checkpoints have), and their
checkpoint names are the ones transformers' conversion mapping for the model type fuses back
on load (Mixtral's ``w1``/``w3``/``w2``, where llm-compressor writes ``gate_proj``/``up_proj``/
``down_proj``). Imported when a model is saved.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
import warnings

import torch
from torch import nn

from qcompare.sdk import QcompareError


@contextlib.contextmanager
def llmcompressor_workarounds(model: nn.Module):
    """What llm-compressor 0.14 needs to run on a CPU-only machine without the Hub (and quiet).

    - ``oneshot`` reloads ``config.json`` from ``model.config._name_or_path`` (to refuse
      models quantized by other methods), and its compressing ``save_pretrained`` copies
      config, recipe and Python files from there; for a hub id that means a download (fails
      offline), and a model built in memory has no such folder. A temporary folder holding
      the model's own config.json stands in.
    - AWQ pins its cached activations (``IntermediatesCache.pin_memory``) to speed up
      host-to-GPU copies; pinning needs an accelerator and fails on CPU-only torch, and is
      pointless without one, so it becomes a no-op there.
    - With ``LLM_COMPRESSOR_LOG_DISABLED=true`` llm-compressor never defines its loguru
      level "METRIC", and GPTQ then fails logging a metric with it; define it if missing.
    - Its save copies a model's multi-token-prediction tensors (DeepSeek-V3's, GLM-4.5's: weights
      transformers does not load) from the checkpoint at ``model.name_or_path``. A model built in memory
      has no checkpoint, hence none to copy, and the empty path crashed the save: the copy is skipped.
    - Its Llama 4 expert splitter reads ``config.text_config``, which a text-only model's config
      (``Llama4ForCausalLM``) does not have: each fused experts module gets its model's config as
      such (``_TextOnly``) for oneshot's split, and loses it afterwards.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache
    from llmcompressor.transformers.compression import compressed_tensors_utils as saving
    from loguru import logger

    from qcompare.sdk import find_targets

    if "METRIC" not in logger._core.levels:  # the same check llm-compressor's logger makes
        logger.level("METRIC", no=38)
    old_name = getattr(model.config, "_name_or_path", "")
    old_mtp = saving.save_mtp_tensors_to_checkpoint
    old_pin = IntermediatesCache.pin_memory
    given = [] if hasattr(model.config, "text_config") else \
        [t.module for t in find_targets(model, (), ("experts",)) if not hasattr(t.module, "config")]
    with tempfile.TemporaryDirectory(prefix="qcompare-llmc-") as folder:
        model.config.save_pretrained(folder)
        model.config._name_or_path = folder
        if not getattr(model, "name_or_path", ""):
            saving.save_mtp_tensors_to_checkpoint = lambda *args, **kwargs: None
        if not torch.cuda.is_available():
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        for module in given:
            module.config = _with_text_config(model.config)
        try:
            yield
        finally:
            IntermediatesCache.pin_memory = old_pin
            model.config._name_or_path = old_name
            saving.save_mtp_tensors_to_checkpoint = old_mtp
            for module in given:
                module.__dict__.pop("config", None)


# --- experts: linearised, under the names transformers fuses back -------------------------------

# llm-compressor's per-expert Linear names, in the order transformers' Concatenate stacks them
_LINEARISED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}
_SOURCE = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")


def expert_save_renamings(model) -> list:
    """Renamings from transformers' own conversion mapping for the model type: the per-expert
    names its loader fuses (``w1``) for the names llm-compressor's linearised experts carry
    (``gate_proj``), so a saved checkpoint loads back into the fused parameters."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    out, seen = [], set()
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        target = conv._original_target_patterns[0].rsplit(".", 1)[-1]
        names = [_SOURCE.search(p) for p in conv._original_source_patterns]
        if target not in _LINEARISED or not all(names) or len(names) != len(_LINEARISED[target]):
            continue
        for match, ours in zip(names, _LINEARISED[target]):
            theirs = match.group(1)
            if theirs != ours and (theirs, ours) not in seen:
                seen.add((theirs, ours))
                out.append(WeightRenaming(rf"\.experts\.(\d+)\.{theirs}\.", rf".experts.\1.{ours}."))
    return out


def set_save_conversions(model) -> None:
    """Have ``save_pretrained`` (which reverses the model's weight conversions) write the names above.
    ``_weight_conversions`` is transformers' own attribute for this, as llm-compressor sets it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    extra = expert_save_renamings(model)
    if extra:
        base = getattr(model, "_weight_conversions", None)
        if base is None:
            base = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        model._weight_conversions = base + extra


class _TextOnly:
    """A text-only model's config as the multimodal config some of llm-compressor's expert splitters read
    (Llama 4's takes ``config.text_config``); every other attribute is the text config's own."""

    def __init__(self, config):
        self.text_config = config

    def __getattr__(self, name):
        return getattr(self.text_config, name)


def _with_text_config(config):
    return config if hasattr(config, "text_config") else _TextOnly(config)


def linearise_experts(model: nn.Module) -> nn.Module:
    """Split torchao-quantized fused experts (``torchao_experts.QuantizedWeights``) into
    llm-compressor's per-expert Linear layers, each holding its slice of the codes and scales as
    an ``IntxUnpackedToInt8Tensor``. Which rows go to which expert and projection is found by
    splitting stand-ins that hold codes, then scales, then zero points in place of the weights:
    llm-compressor's own split, whatever the layout."""
    from compressed_tensors.offload.dispatch import remove_dispatch
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from qcompare_plugins.torchao_experts import quantized

    for module in quantized(model):
        name = next(n for n, m in model.named_modules() if m is module)
        split = LinearExperts2D.get_linear_experts_cls(module._qcompare_base)
        config = _with_text_config(getattr(module, "config", model.config))
        tensors = [module._buffers[k] for k in module.quantized_shapes]
        some = tensors[0]
        per_channel = all(t.block_size[-1] == t.qdata.shape[-1] for t in tensors)

        def linear(fill):
            return split.from_experts_module(_stand_in(module, fill), config)

        codes = dict(linear(lambda t: t.qdata.float()).named_modules())
        scales = dict(linear(lambda t: t.scale.repeat_interleave(t.block_size[-1], -1)).named_modules())
        zeros = dict(linear(lambda t: t.zero_point.float().repeat_interleave(t.block_size[-1], -1)).named_modules())
        # the new Linears sit behind compressed-tensors' offload caches, which refuse a tensor subclass
        result = remove_dispatch(linear(lambda t: t.dequantize()))
        for sub, m in result.named_modules():
            if isinstance(m, nn.Linear) and sub in codes:
                group = m.in_features if per_channel else some.block_size[-1]
                q = codes[sub].weight.detach().to(torch.int8)
                s = scales[sub].weight.detach()[:, ::group].contiguous()
                z = zeros[sub].weight.detach()[:, ::group].to(torch.int8).contiguous()
                m._parameters["weight"] = nn.Parameter(
                    IntxUnpackedToInt8Tensor(q, s, z, some.target_dtype, (1, group), some.dtype, None),
                    requires_grad=False)
        model.set_submodule(name, result)
    return model


def _stand_in(module, fill):
    """The fused experts module as its own class again, holding ``fill(int tensor)`` as each weight."""
    from qcompare_plugins.torchao_experts import from_rows

    holder = copy.copy(module)
    holder.__dict__ = {**module.__dict__, "_parameters": dict(module._parameters), "_buffers": {}}
    holder.__class__ = module._qcompare_base
    transposed = getattr(module, "is_transposed", False)
    for key, shape in module.quantized_shapes.items():
        values = from_rows(fill(module._buffers[key]), shape, transposed)
        holder._parameters[key] = nn.Parameter(values.contiguous(), requires_grad=False)
    return holder


def has_linear_experts(model: nn.Module) -> bool:
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return any(isinstance(m, LinearExperts2D) for m in model.modules())


# --- the checkpoint --------------------------------------------------------------------------------


def save_compressed(model: nn.Module, folder, bits: int, group_size: int, symmetric: bool,
                    actorder: str | None = None) -> None:
    """Write a converted model whose quantized Linear layers hold ``IntxUnpackedToInt8Tensor``
    weights (``bits`` per code, groups of ``group_size`` along the input, 0 = per channel) as a
    compressed-tensors checkpoint (packed ints); ``actorder`` as the calibration recorded it."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    from qcompare.sdk import apply_int_grid
    from qcompare_plugins.torchao_experts import quantized

    plain = copy.deepcopy(model)
    if quantized(plain):
        plain = linearise_experts(plain)
    if has_linear_experts(plain) and not symmetric:
        raise QcompareError("cannot save asymmetric int experts in a format transformers loads (its compressed-tensors "
                            "loader for fused MoE experts takes no zero points); use symmetric = true to export MoE "
                            "models")
    grids = {}
    with torch.no_grad():
        for name, m in plain.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) and type(w).__name__ == "IntxUnpackedToInt8Tensor":
                grids[name] = (w.scale.detach(), w.zero_point.detach())
                m.weight = nn.Parameter(w.dequantize(), requires_grad=False)  # the same values, on the grid
    ignored = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in grids]  # apply_int_grid's
    apply_int_grid(plain, grids, bits, group_size, symmetric, actorder)
    set_save_conversions(plain)
    with llmcompressor_workarounds(plain), warnings.catch_warnings():
        # llm-compressor wraps modules for accelerate while saving, and transformers then warns
        # about "offloaded modules" although everything is in memory
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        modify_save_pretrained(plain)
        plain.save_pretrained(str(folder), save_compressed=True)
    ignore_loaded_names(folder, ignored)


def ignore_loaded_names(folder, names: list[str]) -> None:
    """Have the checkpoint's ignore list name its float Linear layers as transformers' loader names them.

    compressed-tensors writes the list in checkpoint names (the model's renamings reversed), while
    transformers' loader applies it to the modules it builds, under their own names: where the two differ
    (Phi-MoE's ``mlp.router`` is saved ``block_sparse_moe.router``: the module part of ``.router.weight`` →
    ``.gate.weight`` is not renamed) a float router that is an ``nn.Linear`` was taken for a quantized one,
    and the folder did not load. Both names are kept: vLLM reads checkpoint names."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    ignore = config["quantization_config"].get("ignore") or []
    config["quantization_config"]["ignore"] = list(dict.fromkeys([*ignore, *names]))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
