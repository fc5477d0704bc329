"""GPTQ and AWQ through vLLM's llm-compressor, handed on as a torchao fake-quant student.

``prepare`` runs llm-compressor's ``oneshot`` (``GPTQModifier``, or ``AWQModifier`` then
``QuantizationModifier``) on the teacher's copy with a sample of the recipe's training data
as calibration set, then turns every
quantized Linear into torchao's ``FakeQuantizedLinear`` whose scales and zero points are
exactly llm-compressor's, frozen. The untrained student therefore computes what the
GPTQ/AWQ model computes (to the bit), and training moves the weights on that same grid.
``convert`` writes the student as a compressed-tensors checkpoint (``cell_dir/compressed``,
packed ints, the format vLLM serves; transformers reloads it to the same logits) and returns
torchao's real int-weight model, whose logits equal the student's (``IntxWeightOnlyConfig``
with the student's scales). A LoRA student keeps float adapters, which that format cannot
hold: the checkpoint holds its quantized base, and ``save`` puts the adapter beside it as a
PEFT adapter (``qcompare.export.save_converted``).

Why the scales stay frozen: GPTQ's error feedback and AWQ's scale search chose each
weight's code *given* those scales; the grid is the result being compared. A trained
scale (torchao "range learning") would make a different quantizer, and a trained zero
point would leave the integer grid the checkpoint format stores.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import warnings
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BeforeValidator, Field
from torch import nn

from qcompare import hookimpl
from qcompare.api import Params, Quantizer
from qcompare.errors import QcompareError
from qcompare_plugins.torchao_quantizer import TorchaoQuantizer, _granularity, _weight_only_config

BITS = (2, 3, 4, 8)


def _known_bits(v):
    if v not in BITS:
        raise ValueError(f"unsupported bits {v!r}; allowed: {', '.join(map(str, BITS))}")
    return v


def _real_group(v):
    if v < 0 or v == 1:
        raise ValueError(f"unsupported group_size {v!r}; allowed: 0 (per channel) or a group of 2 or more weights")
    return v


class LlmCompressorParams(Params):
    bits: Annotated[Literal[2, 3, 4, 8], BeforeValidator(_known_bits)] = Field(
        4, description="bits per weight code (int, weight-only); vLLM serves 4 and 8")
    group_size: Annotated[int, AfterValidator(_real_group)] = Field(
        32, description="weights sharing one scale along the input features; 0 = per channel "
                              "(32 like the torchao quantizer, so that default recipes compare one grid)")
    symmetric: bool = Field(True, description="symmetric grid (no zero point); false adds an int zero point per group")
    calibration_samples: int = Field(128, gt=0, description="training-data conversations used for calibration")
    calibration_length: int = Field(512, gt=0, description="maximum tokens per calibration conversation")
    ignore: list[str] = Field(
        ["lm_head"], description="modules left in float: names, or 're:<regex>' as llm-compressor reads them")


class GPTQParams(LlmCompressorParams):
    dampening_frac: float = Field(
        0.01, gt=0, lt=1, description="fraction of the Hessian's mean diagonal added to it for stability")


class AWQParams(LlmCompressorParams):
    pass


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


def _check_targets(model: nn.Module, params: LlmCompressorParams, quantizer: str) -> None:
    """Check the Linear layers llm-compressor will quantize (found by its own matcher) before
    calibrating: a group size that does not divide one fails deep inside llm-compressor."""
    from compressed_tensors.utils import match_named_modules

    targets = list(match_named_modules(model, ["Linear"], params.ignore))
    if not targets:
        raise QcompareError(f"{quantizer}: no Linear layer left to quantize after ignore {params.ignore}; "
                            "allowed: models with nn.Linear layers not all ignored")
    for name, module in targets:
        if params.group_size and module.in_features % params.group_size:
            raise QcompareError(
                f"{quantizer}: group_size {params.group_size} does not divide {name}.in_features="
                f"{module.in_features}; use a group size that divides it, or 0 (per channel)")


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


def _modifiers(params: LlmCompressorParams) -> tuple:
    groups, ignore = {"group_0": _scheme(params)}, list(params.ignore)
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
    return IntxFakeQuantizeConfig(getattr(torch, f"int{params.bits}"), granularity=_granularity(params.group_size),
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


def save_compressed(student: nn.Module, params: LlmCompressorParams, folder, tokenizer=None) -> None:
    """Write the student's quantized weights as a compressed-tensors checkpoint (packed ints)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    from torchao.quantization.qat import FakeQuantizedLinear

    plain = copy.deepcopy(student)
    grid = {}
    with torch.no_grad():
        for name, m in list(plain.named_modules()):
            if isinstance(m, FakeQuantizedLinear):
                fq = m.weight_fake_quantizer
                linear = m.to_linear()
                linear.weight = nn.Parameter(fq(m.weight).detach(), requires_grad=False)  # on the grid
                plain.set_submodule(name, linear)
                grid[name] = (fq.scale.detach(), fq.zero_point.detach())
    # the shape llm-compressor itself writes (and vLLM reads): target "Linear", ignore by name
    ignore = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in grid]
    config = QuantizationConfig(config_groups={"group_0": _scheme(params)}, ignore=ignore,
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(plain, config, show_progress=False)
    with torch.no_grad():
        for name, (scale, zero_point) in grid.items():
            m = plain.get_submodule(name)
            m.weight_scale.copy_(scale.to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(zero_point.round().to(m.weight_zero_point.dtype))
    with _llmcompressor_workarounds(plain), warnings.catch_warnings():
        # llm-compressor wraps modules for accelerate while saving, and transformers then warns
        # about "offloaded modules" although everything is in memory
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        modify_save_pretrained(plain)
        plain.save_pretrained(str(folder), save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


class _LlmCompressorQuantizer(Quantizer):
    """Common ground of the GPTQ and AWQ quantizers."""

    def calibrate(self, model, params, context):
        """Run llm-compressor's oneshot on ``model`` in place; return the compressed-tensors model."""
        from llmcompressor import oneshot

        _check_targets(model, params, self.name)
        data, tokenizer = getattr(context, "data", None), getattr(context, "tokenizer", None)
        dataset = _calibration_set(data, tokenizer, params, self.name)
        with context.progress.task(f"{self.name} calibration ({len(dataset)} samples)"), \
                _llmcompressor_workarounds(model):
            oneshot(model=model, dataset=dataset, recipe=list(_modifiers(params)), processor=context.tokenizer,
                    num_calibration_samples=len(dataset), max_seq_length=params.calibration_length,
                    shuffle_calibration_samples=False)
        return model

    def prepare(self, model, params, context):
        return student_from_calibrated(self.calibrate(model, params, context), params)

    def convert(self, student, params, context):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

        if not any(isinstance(m, FakeQuantizedLinear) for m in student.modules()):
            raise QcompareError(f"{self.name}: convert needs a student made by {self.name}'s prepare; "
                                "this model has no fake-quantized Linear layers")
        if context is not None and context.cell_dir is not None:
            from qcompare.export import without_adapters

            # a LoRA distiller keeps its adapters in float beside the quantized layers (merging
            # them would re-quantize W + BA); the checkpoint holds the base, save adds the adapter
            with without_adapters(student) as base:
                save_compressed(base, params, context.cell_dir / "compressed", context.tokenizer)
        with torch.no_grad():
            quantize_(student, QATConfig(_weight_only_config(params), step="convert"),
                      filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
        return student.eval()

    def save(self, model, params, folder, context):
        """The compressed-tensors checkpoint that convert wrote (transformers and vLLM load it)."""
        source = context.cell_dir / "compressed"
        if not (source / "config.json").is_file():
            raise QcompareError(f"{self.name}: no compressed-tensors checkpoint for this cell ({source} is "
                                "missing); convert writes it, so re-run the cell")
        shutil.copytree(source, folder, dirs_exist_ok=True)

    def bits_per_weight(self, params) -> float:
        """The code plus a 16-bit scale per group and, if asymmetric, a zero point of the code's
        width (as compressed-tensors packs it). Per channel counts no overhead (row length unknown)."""
        if not params.group_size:
            return float(params.bits)
        return params.bits + (16 + (0 if params.symmetric else params.bits)) / params.group_size

    def storage_bytes(self, model) -> int:
        """Bytes held in memory by the converted torchao model (one int8 per code)."""
        return TorchaoQuantizer().storage_bytes(model)


class GPTQQuantizer(_LlmCompressorQuantizer):
    """GPTQ (llm-compressor): Hessian-aware rounding on calibration data; trainable on its grid."""

    name = "gptq"
    Params = GPTQParams


class AWQQuantizer(_LlmCompressorQuantizer):
    """AWQ (llm-compressor): activation-aware channel scaling, then rounding; trainable on its grid."""

    name = "awq"
    Params = AWQParams


@hookimpl
def register_quantizers(register):
    register(GPTQQuantizer)
    register(AWQQuantizer)
