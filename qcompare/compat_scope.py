"""Which checkpoints load right only after ``import qcompare.compat`` — kept apart from the patches,
so that asking (the model card, the reload check) never applies them in the process that asks."""

from __future__ import annotations

import functools
import importlib

# model types whose checkpoints need the patches whatever their format (Falcon's initialisation)
MODEL_TYPES = {"falcon"}


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
    torchao int weights that the modeling code transposes, Falcon's weight initialisation, and
    bitsandbytes' CPU path (what the patches are for)."""
    model_type = config.get("model_type", "")
    method = (config.get("quantization_config") or {}).get("quant_method")
    return model_type in MODEL_TYPES or (method == "torchao" and uses_conv1d(model_type)) or method == "bitsandbytes"
