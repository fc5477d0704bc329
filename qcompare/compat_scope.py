"""Which checkpoints load right only after ``import qcompare.compat`` — kept apart from the patches,
so that asking (the model card, the reload check) never applies them in the process that asks."""

from __future__ import annotations

import functools
import importlib

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


def needed_by(config: dict) -> bool:
    """Whether a checkpoint with this ``config.json`` loads right only after ``import qcompare.compat``:
    torchao int weights that the modeling code transposes, Falcon's weight initialisation,
    bitsandbytes' CPU path, and per-expert checkpoints of ``PER_EXPERT_LOADING`` (what the patches are for)."""
    model_type = config.get("model_type", "")
    method = (config.get("quantization_config") or {}).get("quant_method")
    return model_type in MODEL_TYPES or (method == "torchao" and uses_conv1d(model_type)) or method == "bitsandbytes" \
        or (method == "compressed-tensors" and model_type in PER_EXPERT_LOADING)
