"""Which checkpoints load right only after ``import qcompare.compat`` — kept apart from the patches,
so that asking (the model card, the reload check) never applies them in the process that asks."""

from __future__ import annotations

import functools
import importlib
import json

# model types whose checkpoints need the patches whatever their format (Falcon's initialisation)
MODEL_TYPES = {"falcon"}
# mixture-of-experts model types whose fused experts transformers' loader cannot rebuild from the one
# Linear per expert (gate_proj, up_proj, down_proj) of a compressed-tensors checkpoint: their conversion
# mapping has no such converter (IBM Granite's renames its own fused names only; Gemma 4, Inkling and
# MiniMax-M3's text model have none). The
# patches register one (qcompare.compat.register_per_expert_loading); the architecture matrix's reload
# proves each exact.
PER_EXPERT_LOADING = {"granitemoe": "stacked", "granitemoe_swa": "stacked", "granitemoehybrid": "stacked",
                      "granitemoeshared": "stacked", "gemma4_text": "stacked", "gpt_oss": "interleaved",
                      "inkling_text": "stacked", "minimax_m3_vl_text": "stacked"}


@functools.cache
def uses_conv1d(model_type: str) -> bool:
    """Whether transformers' modeling code for ``model_type`` builds its layers from ``Conv1D``."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return False
    return "Conv1D" in vars(module)


def meta_model(config: dict):
    """The causal LM ``config`` (a ``config.json`` as a dict, ``model_type`` included) describes, built on the
    meta device: every module and shape, no memory. Raises what transformers raises for a config it cannot
    build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.get("model_type"), **cfg))


def init_reads_compressed_weights(config: dict) -> bool:
    """Whether transformers' weight initialisation for this checkpoint reads the ``.weight`` of a layer that a
    compressed-tensors checkpoint keeps compressed (GPTBigCode's ``_init_weights`` draws ``c_proj.weight``;
    a compressed Linear holds ``weight_packed`` instead, and loading fails). Decided by running the family's
    own ``_init_weights`` on its meta-device model with the quantized Linear layers' weights taken away,
    not by a list of families."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return _init_reads(blob)


@functools.cache
def _init_reads(blob: str) -> bool:
    import torch

    config = json.loads(blob)
    quantization = config.get("quantization_config") or {}
    if "pack" not in str(quantization.get("format", "")):  # int-, float- and naive-quantized layers keep .weight
        return False
    try:
        from compressed_tensors.utils.match import is_match
    except ImportError:  # no compressed-tensors: such a checkpoint does not load here at all
        return False
    ignore = quantization.get("ignore") or []
    with torch.device("meta"):  # the initialisation too: a causal mask of the full context would be real memory
        try:
            model = meta_model(config)
        except Exception:  # noqa: BLE001 - a model transformers cannot build: loading it will say so
            return False
        emptied = set()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(is_match(name, module, p) for p in ignore):
                del module._parameters["weight"]
                emptied.add(id(module))
        for module in model.modules():
            try:
                model._init_weights(module)
            except AttributeError as e:
                if getattr(e, "name", None) == "weight" and id(getattr(e, "obj", None)) in emptied:
                    return True
            except Exception:  # noqa: BLE001 - only a read of a compressed layer's weight is what this asks
                continue
    return False


def needed_by(config: dict) -> bool:
    """Whether a checkpoint with this ``config.json`` loads right only after ``import qcompare.compat``:
    torchao int weights that the modeling code transposes, Falcon's weight initialisation,
    bitsandbytes' CPU path, per-expert checkpoints of ``PER_EXPERT_LOADING``, and compressed layers a family's
    initialisation reads (``init_reads_compressed_weights``): what the patches are for."""
    model_type = config.get("model_type", "")
    method = (config.get("quantization_config") or {}).get("quant_method")
    return model_type in MODEL_TYPES or (method == "torchao" and uses_conv1d(model_type)) or method == "bitsandbytes" \
        or (method == "compressed-tensors" and (model_type in PER_EXPERT_LOADING or init_reads_compressed_weights(config)))
