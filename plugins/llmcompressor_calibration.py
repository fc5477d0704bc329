"""llm-compressor's side of the GPTQ and AWQ quantizers: calibration, the torchao student on
its grid, and the compressed-tensors checkpoint. Imported when a cell runs, never when plugins
are listed or a recipe is validated. See ``qcompare_plugins.llmcompressor_quantizers``.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings

import torch
from torch import nn

from qcompare.errors import QcompareError
from qcompare.targets import find_targets
from qcompare_plugins.llmcompressor_quantizers import GPTQParams, LlmCompressorParams
from qcompare_plugins.torchao_grids import granularity, weight_only_config


# --- the CPU / offline workarounds, in one place -------------------------------------


@contextlib.contextmanager
def _llmcompressor_workarounds(model: nn.Module):
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
    """
    from llmcompressor.pipelines.cache import IntermediatesCache
    from loguru import logger

    if "METRIC" not in logger._core.levels:  # the same check llm-compressor's logger makes
        logger.level("METRIC", no=38)

    old_name = getattr(model.config, "_name_or_path", "")
    old_pin = IntermediatesCache.pin_memory
    with tempfile.TemporaryDirectory(prefix="qcompare-llmc-") as folder:
        model.config.save_pretrained(folder)
        model.config._name_or_path = folder
        if not torch.cuda.is_available():
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        try:
            yield
        finally:
            IntermediatesCache.pin_memory = old_pin
            model.config._name_or_path = old_name


# --- calibration -----------------------------------------------------------------------


def _scheme(params: LlmCompressorParams):
    """The compressed-tensors weight scheme: int, static scales, groups in column order."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=params.bits, type="int", symmetric=params.symmetric,
        strategy="group" if params.group_size else "channel", group_size=params.group_size or None,
        # "static" keeps groups over consecutive columns (no g_idx permutation): the grid
        # torchao's PerGroup fake quantizer and vLLM's kernels read.
        actorder="static" if isinstance(params, GPTQParams) else None)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def skipped_linears(model: nn.Module, params: LlmCompressorParams, quantizer: str) -> list[str]:
    """The names of the Linear layers ``skip`` leaves in float, as llm-compressor's ``ignore`` takes
    them (exact names), after checking the layers that will be quantized: a group size that does
    not divide one fails deep inside llm-compressor."""
    targets = find_targets(model, params.skip, ("linear",))
    if not targets:
        raise QcompareError(f"{quantizer}: no Linear layer left to quantize after skip {params.skip}; "
                            "allowed: models with nn.Linear layers not all skipped")
    for t in targets:
        if params.group_size and t.in_features % params.group_size:
            raise QcompareError(
                f"{quantizer}: group_size {params.group_size} does not divide {t.name}.in_features="
                f"{t.in_features}; use a group size that divides it, or 0 (per channel)")
    chosen = {t.name for t in targets}
    return [t.name for t in find_targets(model, (), ("linear",)) if t.name not in chosen]


def _calibration_set(data, tokenizer, params: LlmCompressorParams, quantizer: str):
    from datasets import Dataset

    if data is None:
        raise QcompareError(f"{quantizer}: needs calibration data; add `[data] train = ...` to the recipe "
                            "(GPTQ and AWQ fit their weights to the activations of real inputs)")
    if "messages" not in data.column_names:
        raise QcompareError(f"{quantizer}: calibration data needs a 'messages' column; found {data.column_names}")
    if not getattr(tokenizer, "chat_template", None):
        raise QcompareError(f"{quantizer}: the tokenizer has no chat template; calibration renders 'messages' with it")
    # a fixed-seed sample, not the first rows: training files are often grouped by kind (the
    # toy world's first 128 rows made GPTQ worse than round-to-nearest; a sample made it
    # better), and the quantizer must not depend on the cell's seed
    rows = data.shuffle(seed=0).select(range(min(params.calibration_samples, len(data))))
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows["messages"]]
    encoded = tokenizer(texts, truncation=True, max_length=params.calibration_length, add_special_tokens=False)
    keep = [i for i, ids in enumerate(encoded["input_ids"]) if ids]
    return Dataset.from_dict({"input_ids": [encoded["input_ids"][i] for i in keep],
                              "attention_mask": [encoded["attention_mask"][i] for i in keep]})


def _modifiers(params: LlmCompressorParams, ignore: list[str]) -> tuple:
    groups = {"group_0": _scheme(params)}
    if isinstance(params, GPTQParams):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return (GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=params.dampening_frac),)
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    # llm-compressor 0.14's AWQ only rescales (norms and Linear columns); a QuantizationModifier
    # after it rounds to nearest on the rescaled weights (the single AWQModifier is deprecated).
    return AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)


# --- the student -----------------------------------------------------------------------


def _fake_quantize_config(params: LlmCompressorParams):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # is_dynamic=False + range_learning=True: torchao keeps the scales it is given (instead
    # of recomputing them from the weights) and its converter reuses them.
    return IntxFakeQuantizeConfig(getattr(torch, f"int{params.bits}"), granularity=granularity(params.group_size),
                                  is_symmetric=params.symmetric, is_dynamic=False, range_learning=True)


def student_from_calibrated(model: nn.Module, params: LlmCompressorParams) -> nn.Module:
    """Turn a model ``oneshot`` has quantized (compressed-tensors, status frozen) into the
    torchao fake-quant student, in place, on exactly its grid."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    grid = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not (isinstance(m, nn.Linear) and hasattr(m, "weight_scale")):
                continue
            # GPTQ leaves .weight on the grid, AWQ does not (its forward rounds on the fly):
            # snap it with compressed-tensors' own rounding so torchao's, which multiplies by
            # 1/scale instead of dividing, cannot pick the other code at a tie.
            m.weight.copy_(fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, m.quantization_scheme.weights))
            # scales in llm-compressor's dtype (the weight's, as torchao's converter keeps them);
            # zero points stay int8, so the converted model stores them as torchao's own does
            grid[name] = (m.weight_scale.detach().clone(), m.weight_zero_point.detach().to(torch.int8))
            del m.weight_scale, m.weight_zero_point
            for attr in ("forward", "quantization_scheme", "quantization_status"):
                m.__dict__.pop(attr, None)  # compressed-tensors' wrapped forward and its tags
    model.__dict__.pop("save_pretrained", None)  # llm-compressor's compressing save wrapper
    quantize_(model, QATConfig(weight_config=_fake_quantize_config(params), step="prepare"),
              filter_fn=lambda m, fqn: fqn in grid)
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizedLinear) and name in grid:
            fq = m.weight_fake_quantizer
            scale, zero_point = grid[name]
            fq.scale = nn.Parameter(scale, requires_grad=False)
            fq.zero_point = nn.Parameter(zero_point, requires_grad=False)
            fq._initialized = True
    return model


def save_compressed(model: nn.Module, params: LlmCompressorParams, folder) -> None:
    """Write a converted model (torchao int weights on the GPTQ/AWQ grid) as a compressed-tensors
    checkpoint (packed ints), the format llm-compressor itself writes and vLLM serves."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    plain = copy.deepcopy(model)
    grid = {}
    with torch.no_grad():
        for name, m in plain.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) and type(w).__name__ == "IntxUnpackedToInt8Tensor":
                grid[name] = (w.scale.detach(), w.zero_point.detach())
                m.weight = nn.Parameter(w.dequantize(), requires_grad=False)  # the same values, on the grid
    # the shape llm-compressor itself writes (and vLLM reads): target "Linear", ignore by name
    ignore = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in grid]
    config = QuantizationConfig(config_groups={"group_0": _scheme(params)}, ignore=ignore,
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(plain, config, show_progress=False)
    with torch.no_grad():
        for name, (scale, zero_point) in grid.items():
            m = plain.get_submodule(name)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(zero_point.reshape(m.weight_zero_point.shape).round().to(m.weight_zero_point.dtype))
    with _llmcompressor_workarounds(plain), warnings.catch_warnings():
        # llm-compressor wraps modules for accelerate while saving, and transformers then warns
        # about "offloaded modules" although everything is in memory
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        modify_save_pretrained(plain)
        plain.save_pretrained(str(folder), save_compressed=True)


def calibrate(model, params, context, quantizer: str):
    """Run llm-compressor's oneshot on ``model`` in place; return the compressed-tensors model."""
    from llmcompressor import oneshot

    ignore = skipped_linears(model, params, quantizer)
    dataset = _calibration_set(context.data, context.tokenizer, params, quantizer)
    with context.progress.task(f"{quantizer} calibration ({len(dataset)} samples)"), \
            _llmcompressor_workarounds(model):
        oneshot(model=model, dataset=dataset, recipe=list(_modifiers(params, ignore)), processor=context.tokenizer,
                num_calibration_samples=len(dataset), max_seq_length=params.calibration_length,
                shuffle_calibration_samples=False)
    return model


def convert(student, params, quantizer: str):
    """torchao's real int-weight model on the student's grid (its scales kept)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    if not any(isinstance(m, FakeQuantizedLinear) for m in student.modules()):
        raise QcompareError(f"{quantizer}: convert needs a student made by {quantizer}'s prepare; "
                            "this model has no fake-quantized Linear layers")
    with torch.no_grad():
        quantize_(student, QATConfig(weight_only_config(params), step="convert"),
                  filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return student.eval()
