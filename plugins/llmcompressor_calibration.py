"""llm-compressor's side of the GPTQ and AWQ quantizers: what it would mishandle, refused first; calibration;
the torchao student on its grid; and the compressed-tensors checkpoint. AWQ's layer mappings live in
``qcompare_plugins.llmcompressor_awq``. Imported when a cell runs or validate checks a model, never when
plugins are listed. See ``qcompare_plugins.llmcompressor_quantizers``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qcompare.sdk import QcompareError, check_read_in_forward, checks, find_targets, skip_patterns
from qcompare_plugins.compressed import llmcompressor_workarounds
from qcompare_plugins.llmcompressor_awq import (awq_mappings, recording_awq, smoothing_preserves_function,
                                              with_every_reader)
from qcompare_plugins.torchao_grids import granularity, weight_only_config


# --- the CPU / offline workarounds, in one place -------------------------------------


# --- calibration -----------------------------------------------------------------------


def _scheme(params):
    """The compressed-tensors weight scheme: int, static scales, groups in column order."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=params.bits, type="int", symmetric=params.symmetric,
        strategy="group" if params.group_size else "channel", group_size=params.group_size or None,
        # "static" keeps groups over consecutive columns (no g_idx permutation): the grid
        # torchao's PerGroup fake quantizer and vLLM's kernels read.
        actorder="static" if params.method == "gptq" else None)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def skipped_linears(model: nn.Module, params, quantizer: str) -> list[str]:
    """The names of the Linear layers ``skip`` leaves in float, as llm-compressor's ``ignore`` takes
    them (exact names), after checking the layers that will be quantized (validate's ``check_model`` runs
    this too): a group size that does not divide one fails deep inside llm-compressor; a weight its fake
    quantizer would not stand for (``check_read_in_forward``: a probe forward, skipped on the meta model);
    fused experts it does not split."""
    conv1d = find_targets(model, params.skip, ("conv1d",))
    if conv1d:
        raise QcompareError(f"{quantizer}: {type(model).__name__} keeps its weights in transformers' Conv1D layers "
                            f"(GPT-2 family, e.g. {conv1d[0].name}), which llm-compressor does not quantize; the "
                            "torchao quantizer handles this family")
    targets = find_targets(model, params.skip, ("linear",))
    if not targets:
        raise QcompareError(f"{quantizer}: no Linear layer left to quantize after skip {params.skip}; "
                            "allowed: models with nn.Linear layers not all skipped")
    for t in targets:
        if params.group_size and t.in_features % params.group_size:
            raise QcompareError(
                f"{quantizer}: group_size {params.group_size} does not divide {t.name}.in_features="
                f"{t.in_features}; use a group size that divides it, or 0 (per channel)")
    experts = find_targets(model, params.skip, ("experts",))
    check_read_in_forward(model, targets + experts, quantizer)
    _refuse_unsplit(model, experts, quantizer)
    chosen = {t.name for t in targets}  # never an expert router: find_targets keeps those apart
    # fused 3-D experts are no Linear layers yet: llm-compressor splits them into one Linear per expert
    # after this list is read, so a skipped experts module is ignored by a pattern over its future parts
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen] + \
        [f"re:^{re.escape(name)}\\..*" for name in skipped_experts(model, params)]


def _refuse_without_statistics(error: AssertionError, model: nn.Module, modifiers, quantizer: str) -> None:
    """GPTQ's "No statistics available" (an observer that saw no weights: Gemma 4's
    ``per_layer_model_projection``, which its calibration reaches without observing) as one line naming the
    layers, and the skip that leaves them float; any other assertion is left as it is."""
    if "No statistics available" not in str(error):
        return
    lost = [m._module_names.get(module, "?") for m in modifiers for module in getattr(m, "_num_samples", {})
            if getattr(module, "weight_observer", None) is not None and not module.weight_observer.has_statistics]
    if lost:
        raise QcompareError(f"{quantizer}: llm-compressor's calibration gathered no statistics for {lost[0]}"
                            f"{f' and {len(lost) - 1} more layers' if len(lost) > 1 else ''}, so it cannot round it "
                            f"— add {skip_patterns(lost, model)} to skip to leave it float") from None


def _refuse_unsplit(model: nn.Module, experts, quantizer: str) -> None:
    """Refuse fused experts llm-compressor does not split into one Linear per expert (neither transformers'
    standard fused layout nor one it registers a splitter for): its calibration would leave them float."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    splits = {id(m) for _, m in get_non_linearized_moes(model)}
    unsplit = [t for t in experts if id(t.module) not in splits]
    if unsplit:
        raise QcompareError(
            f"{quantizer}: {type(unsplit[0].module).__name__} ({unsplit[0].name}) keeps its experts in a layout "
            "llm-compressor does not split into one Linear per expert, so they would stay float; the torchao "
            "quantizer quantizes them, or leave them in float with skip = [\"lm_head\", "
            f"{skip_patterns((t.name for t in unsplit), model)}] and a lower min_coverage for this quantizer")


def split_experts(model: nn.Module, context, quantizer: str) -> None:
    """llm-compressor's split of fused experts into one Linear per expert (what oneshot does first), done
    here and held to what the model computed (``checks.FunctionWatch``, kept as ``context.checks["expert_split"]``):
    a split that fails or runs another function (MiniMax-M3's experts read ``swiglu_alpha``, which the split
    drops: its forward fails) is refused in one line. Running out of memory is not a refusal: it is raised."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe

    fused = get_non_linearized_moes(model)
    if not fused:
        return
    what = f"llm-compressor's split of {type(fused[0][1]).__name__} into one Linear per expert"
    watch = checks.FunctionWatch(model)
    try:
        linearize_moe(model)
        watch.verdict_into(context.checks, "expert_split", model, checks.dtype_tolerance(model), what)
    except checks.CheckFailed as e:
        raise QcompareError(f"{quantizer}: {e}; the torchao quantizer quantizes these fused experts") from None
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the split's own code fails on this family: said in one line
        raise QcompareError(f"{quantizer}: {what} fails ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                            "the torchao quantizer quantizes these fused experts") from None


def skipped_experts(model: nn.Module, params) -> list[str]:
    """The fused experts modules ``skip`` leaves in float."""
    quantized = {t.name for t in find_targets(model, params.skip, ("experts",))}
    return sorted({t.name for t in find_targets(model, (), ("experts",))} - quantized)


def _calibration_set(data, tokenizer, params, quantizer: str):
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


def _modifiers(params, ignore: list[str], model: nn.Module, quantizer: str) -> tuple:
    groups = {"group_0": _scheme(params)}
    if params.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return (GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=params.dampening_frac),)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # llm-compressor 0.14's AWQ only rescales (norms and Linear columns); a QuantizationModifier
    # after it rounds to nearest on the rescaled weights (the single AWQModifier is deprecated).
    mappings, added = with_every_reader(model, awq_mappings(model, quantizer), quantizer)
    awq = recording_awq()(mappings=mappings)
    awq._qcompare_added = added
    return awq, QuantizationModifier(config_groups=groups, ignore=ignore)


# --- the student -----------------------------------------------------------------------


def _fake_quantize_config(params):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # is_dynamic=False + range_learning=True: torchao keeps the scales it is given (instead
    # of recomputing them from the weights) and its converter reuses them.
    return IntxFakeQuantizeConfig(getattr(torch, f"int{params.bits}"), granularity=granularity(params.group_size),
                                  is_symmetric=params.symmetric, is_dynamic=False, range_learning=True)


def student_from_calibrated(model: nn.Module, params) -> nn.Module:
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


def save_compressed(model: nn.Module, params, folder) -> None:
    """Write a converted model (torchao int weights on the GPTQ/AWQ grid) as a compressed-tensors
    checkpoint (packed ints), the format llm-compressor itself writes and vLLM serves."""
    from qcompare.sdk import expert_params
    from qcompare_plugins.compressed import save_compressed as save

    kept = [n for n, m in model.named_modules() if n and expert_params(m)]
    if kept:  # transformers writes them one float Linear per expert, which its compressed-tensors loader misreads
        raise QcompareError(f"cannot save fused experts left in float ({kept[0]}, ...: skip names them) in a "
                            "compressed-tensors folder transformers loads back; the cell keeps its results")
    save(model, folder, params.bits, params.group_size, params.symmetric, _scheme(params).weights.actorder)


def calibrate(model, params, context, quantizer: str):
    """Run llm-compressor's oneshot on ``model`` in place; return the compressed-tensors model."""
    from llmcompressor import oneshot

    ignore = skipped_linears(model, params, quantizer)
    float_experts = skipped_experts(model, params)
    dataset = _calibration_set(context.data, context.tokenizer, params, quantizer)
    modifiers = list(_modifiers(params, ignore, model, quantizer))
    recorded = [m for m in modifiers if hasattr(m, "skipped")]
    with llmcompressor_workarounds(model):
        split_experts(model, context, quantizer)
        watch = checks.FunctionWatch(model) if recorded else None  # what the float model computed before smoothing
        with context.progress.task(f"{quantizer} calibration ({len(dataset)} samples)"):
            try:
                oneshot(model=model, dataset=dataset, recipe=modifiers, processor=context.tokenizer,
                        num_calibration_samples=len(dataset), max_seq_length=params.calibration_length,
                        shuffle_calibration_samples=False)
            except AssertionError as e:
                _refuse_without_statistics(e, model, modifiers, quantizer)
                raise
    _refuse_experts(model, float_experts)
    if recorded:
        smoothing_preserves_function(model, watch, recorded[0].mappings, context)
        skipped = recorded[0].skipped(model)
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        summary = (f"skipped smoothing of {len(skipped)} layers ({shown}); llm-compressor found their shapes "
                   "incompatible (grouped-query attention's v_proj → o_proj)") if skipped else ""
        added = recorded[0]._qcompare_added
        if added:
            summary = "; ".join(filter(None, [summary, "balanced the layers that also read a smoothed output: " + "; ".join(
                f"{smooth} → {', '.join(b)}" for smooth, b in added.items())]))
        context.notes["awq"] = {"mappings": len(recorded[0].mappings), "skipped_smoothing": skipped,
                                "added_balance_layers": added, "summary": summary}
    return model


def _refuse_experts(model: nn.Module, names: list[str]) -> None:
    """Put the skipped experts back as the model's own fused module: llm-compressor split them into one
    float Linear per expert for calibration, a layout the saved folder's loader would not fuse back."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LinearExperts2D):
            model.set_submodule(name, module.to_experts_module())


def convert(student, params, quantizer: str):
    """torchao's real int-weight model on the student's grid (its scales kept); ``qcompare.compat``
    supplies the products with an int weight that modeling code computes outside ``F.linear``."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    from qcompare.sdk import compat  # noqa: F401 - Jamba's dt_proj.weight @ x, Falcon's x @ W.T

    if not any(isinstance(m, FakeQuantizedLinear) for m in student.modules()):
        raise QcompareError(f"{quantizer}: convert needs a student made by {quantizer}'s prepare; "
                            "this model has no fake-quantized Linear layers")
    with torch.no_grad():
        quantize_(student, QATConfig(weight_only_config(params), step="convert"),
                  filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return student.eval()
