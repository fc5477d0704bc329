"""llm-compressor's side of the GPTQ and AWQ quantizers: calibration, the torchao student on
its grid, and the compressed-tensors checkpoint. Imported when a cell runs, never when plugins
are listed or a recipe is validated. See ``qcompare_plugins.llmcompressor_quantizers``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qcompare.sdk import QcompareError, checks, find_targets
from qcompare_plugins.compressed import llmcompressor_workarounds
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
    them (exact names), after checking the layers that will be quantized: a group size that does
    not divide one fails deep inside llm-compressor."""
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
    chosen = {t.name for t in targets}  # never an expert router: find_targets keeps those apart
    # fused 3-D experts are no Linear layers yet: llm-compressor splits them into one Linear per expert
    # after this list is read, so a skipped experts module is ignored by a pattern over its future parts
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen] + \
        [f"re:^{re.escape(name)}\\..*" for name in skipped_experts(model, params)]


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
    mappings, added = with_every_reader(model, awq_mappings(model, quantizer))
    awq = _recording_awq()(mappings=mappings)
    awq._qcompare_added = added
    return awq, QuantizationModifier(config_groups=groups, ignore=ignore)


# --- AWQ: layer mappings for every family, and what it smoothed ------------------------------------


def awq_mappings(model: nn.Module, quantizer: str = "awq"):
    """AWQ's smooth → balance layer mappings for ``model``: llm-compressor's own where it registers
    the architecture; the Qwen3-MoE mappings for any other mixture-of-experts model (their router
    balance keeps routing as it was; llm-compressor's fallback leaves routers out and changes which
    experts tokens go to); otherwise the first set whose layers all exist in the model, trying in
    turn qcompare's own for Falcon and GPT-NeoX layouts, llm-compressor's defaults and every other
    set it registers (OLMo-2 takes OLMo-3's). No set fits: a one-line error naming the families
    AWQ supports.

    Falcon and GPT-NeoX get norm → Linear pairs only: their qkv is fused (multi-query on Falcon),
    so its value rows are not the dense layer's inputs one to one (AutoAWQ and llm-compressor's
    own Bloom mapping leave that pair out too), and their GELU is no module to scale."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, AWQMapping, default_mappings

    arch = type(model).__name__
    falcon_qkv, up = "re:.*self_attention\\.query_key_value$", "re:.*mlp\\.dense_h_to_4h$"
    ours = [
        [AWQMapping("re:.*ln_attn$", [falcon_qkv]), AWQMapping("re:.*ln_mlp$", [up])],  # Falcon-40B/180B
        [AWQMapping("re:.*input_layernorm$", [falcon_qkv]), AWQMapping("re:.*post_attention_layernorm$", [up])],
        [AWQMapping("re:.*input_layernorm$", [falcon_qkv, up])],  # Falcon-7B: one norm feeds attention and MLP
        [AWQMapping("re:.*input_layernorm$", ["re:.*attention\\.query_key_value$"]),  # GPT-NeoX
         AWQMapping("re:.*post_attention_layernorm$", [up])],
    ]
    names = [n for n, _ in model.named_modules()]
    experts = find_targets(model, (), ("experts",))
    if arch in AWQ_MAPPING_REGISTRY:
        _resolve_as_oneshot(model, AWQ_MAPPING_REGISTRY[arch], experts, quantizer)
        return AWQ_MAPPING_REGISTRY[arch]
    if experts:  # its patterns name the per-expert layers oneshot splits them into
        mappings = AWQ_MAPPING_REGISTRY["Qwen3MoeForCausalLM"]
        # every layer they name must be there once oneshot has split the experts (one Linear each, named as
        # below): a router by another name would crash oneshot after validate had let the cell through
        split = names + [f"{t.name}.0.{proj}" for t in experts for proj in ("gate_proj", "up_proj", "down_proj")]
        missing = [p for m in mappings for p in (m.smooth_layer, *m.balance_layers) if not _matches_any(split, p)]
        if missing:
            routers = sorted({n.split(".")[-1] for n in names if n.endswith((".router", ".gate"))}) or ["none found"]
            raise QcompareError(f"{quantizer}: AWQ's mixture-of-experts mappings name {missing[0].removeprefix('re:')} "
                                f"and {arch} has no such layer (its routers: {', '.join(routers)}); AWQ takes "
                                "mixture-of-experts models whose router is named gate (Qwen3-MoE, Mixtral, OLMoE)")
        _resolve_as_oneshot(model, mappings, experts, quantizer)
        return mappings
    candidates = ours + [default_mappings] + list({id(m): m for m in AWQ_MAPPING_REGISTRY.values()}.values())
    for mappings in candidates:
        if all(_matches_any(names, m.smooth_layer) and all(_matches_any(names, b) for b in m.balance_layers)
               for m in mappings):
            return mappings
    known = sorted({a.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration") for a in AWQ_MAPPING_REGISTRY}
                   | {"Falcon", "GPTNeoX", "any mixture-of-experts model"})
    raise QcompareError(f"{quantizer}: no AWQ layer mappings fit {arch} (none of llm-compressor's or qcompare's sets "
                        f"names its layers); AWQ supports: {', '.join(known)}")


def with_every_reader(model: nn.Module, mappings) -> tuple[list, dict[str, list[str]]]:
    """``mappings`` with every layer that reads a smoothing layer's output among its balance layers, and
    what was added (smoothing pattern → the patterns of the layers added to its balance).

    Smoothing divides the smoothing layer's output by per-channel scales; the function is kept only if every
    layer reading that output multiplies its weight's input columns by them. A set written for one family
    misses what another adds beside it (Qwen2-MoE's shared expert and its gate read the norm its routed
    experts read; llm-compressor's own Qwen2-MoE set leaves them out: logits move by 10%). The readers are
    found by running the model once on the probe batch: the modules holding a 2-D weight, or fused experts,
    whose input is a smoothing layer's output (the same storage). Each missing one is added by its name
    inside the block; where blocks differ (a dense first layer before mixture-of-experts ones), the mapping
    is split into one per kind of block, each restricted to its blocks."""
    import dataclasses

    readers = _readers(model, mappings)
    experts = {t.name for t in find_targets(model, (), ("experts",))}
    names = [n for n, _ in model.named_modules()]

    def balanced(name, mapping) -> bool:  # fused experts by the names oneshot splits them into
        as_split = [f"{name}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")] if name in experts else [name]
        return any(_matches_any(as_split, b) for b in mapping.balance_layers)

    out, added = [], {}
    for mapping in mappings:
        kinds: dict[tuple, list[str]] = {}  # the balance patterns a block misses → its blocks
        for smooth, read_by in readers.items():
            if not _matches_any([smooth], mapping.smooth_layer):
                continue
            block = smooth.rpartition(".")[0]
            # only inside the module llm-compressor reruns for this mapping (its balance layers' lowest common
            # ancestor): a reader beyond it would give two mappings one parent, which its AWQ does not take;
            # the function check names such a reader instead
            within = _common_prefix([n for n in names if n.startswith(block + ".") and balanced(n, mapping)])
            missing = ["re:.*" + re.escape(name[len(block) + 1:]) + "$" for name in read_by
                       if not balanced(name, mapping) and within and name.startswith(within + ".")]
            kinds.setdefault(tuple(dict.fromkeys(missing)), []).append(block)
        extras = [b.removeprefix("re:") for kind in kinds for b in kind]
        if extras:
            added[mapping.smooth_layer.removeprefix("re:")] = list(dict.fromkeys(extras))
        if len(kinds) <= 1:
            extra = [m for m in next(iter(kinds), ()) if m not in mapping.balance_layers]
            out.append(dataclasses.replace(mapping, balance_layers=[*mapping.balance_layers, *extra]))
            continue
        for extra, blocks in kinds.items():
            only = "(?=(?:" + "|".join(re.escape(b) for b in blocks) + r")\.)"
            out.append(dataclasses.replace(mapping, smooth_layer=_within(only, mapping.smooth_layer),
                                           balance_layers=[_within(only, b) for b in [*mapping.balance_layers, *extra]]))
    return out, added


def _common_prefix(names: list[str]) -> str:
    """The lowest module containing all of ``names`` (a single name: the module itself)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) if parts else ""


def _within(prefix: str, pattern: str) -> str:
    """``pattern`` (a name, or a regex after ``re:``) matched only where ``prefix`` (a lookahead) matches too."""
    return "re:" + prefix + (pattern[3:] if pattern.startswith("re:") else re.escape(pattern) + "$")


def _readers(model: nn.Module, mappings) -> dict[str, list[str]]:
    """Smoothing layer name → the names of the weight-holding modules (a 2-D weight, or fused experts) whose
    first input is that layer's output, observed on the probe batch."""
    from qcompare.sdk import expert_params

    smoothing = {n for n, _ in model.named_modules() if any(_matches_any([n], m.smooth_layer) for m in mappings)}
    outputs, readers, kept = {}, {}, []

    def wrote(name):
        def hook(module, args, out):
            t = checks.first_tensor(out)
            if t is not None:
                kept.append(t)  # alive until the trace ends: its storage is not reused by another tensor
                outputs[t.untyped_storage().data_ptr()] = name
        return hook

    def read(name):
        def hook(module, args, kwargs):
            t = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            source = outputs.get(t.untyped_storage().data_ptr()) if torch.is_tensor(t) else None
            if source is not None and name not in readers.setdefault(source, []):
                readers[source].append(name)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name in smoothing:
            handles.append(module.register_forward_hook(wrote(name)))
        weight = module._parameters.get("weight")
        if (weight is not None and weight.ndim == 2 and not isinstance(module, nn.Embedding)) or expert_params(module):
            handles.append(module.register_forward_pre_hook(read(name), with_kwargs=True))
    try:
        checks.probe_logits(model)
    finally:
        for h in handles:
            h.remove()
    return readers


def _resolve_as_oneshot(model: nn.Module, mappings, experts, quantizer: str) -> None:
    """Resolve ``mappings`` as llm-compressor's AWQ does when oneshot starts (``match_modules_set`` over
    the modules, once the experts are split into one Linear each), here on the names alone, so a model
    they do not fit (a dense layer among expert layers, a router that is no Linear) is refused in one
    line at validate instead of crashing oneshot."""
    from compressed_tensors.utils.match import match_modules_set

    split = {t.name: t.weight.shape[0] for t in experts}
    modules = []
    for name, module in model.named_modules():
        if any(name.startswith(e + ".") for e in split):
            continue
        modules.append((name, module))
        for i in range(split.get(name, 0)):
            modules += [(f"{name}.{i}", _Named("Module"))]
            modules += [(f"{name}.{i}.{proj}", _Named("Linear")) for proj in ("gate_proj", "up_proj", "down_proj")]

    class Names:
        def named_modules(self):
            return iter(modules)

    arch = type(model).__name__
    for mapping in mappings:
        try:
            for smooth, *balance in match_modules_set(Names(), (mapping.smooth_layer, *mapping.balance_layers)):
                where = [n for n, m in modules if any(m is s for s in smooth)]
                if len(smooth) > 1:
                    raise ValueError(f"its smoothing layer matches {len(smooth)} layers in one block "
                                     f"({', '.join(where[:3])}), not one")
                unweighted = [n for n, m in modules for group in balance for b in group
                              if m is b and not isinstance(m, _Named) and not hasattr(m, "weight")]
                if unweighted:
                    raise ValueError(f"{unweighted[0]} ({type(dict(modules)[unweighted[0]]).__name__}) has no weight "
                                     "to balance")
        except ValueError as e:
            first = str(e).splitlines()[0].rstrip(".")
            raise QcompareError(f"{quantizer}: AWQ's mapping {mapping.smooth_layer.removeprefix('re:')} → "
                                f"{', '.join(b.removeprefix('re:') for b in mapping.balance_layers)} does not fit "
                                f"{arch} ({first}); its layers are not the ones these mappings were written for: use "
                                "gptq or torchao for this family") from None


class _Named(nn.Module):
    """A stand-in for a module oneshot will create, matched by name only."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind


def _matches_any(names: list[str], pattern: str) -> bool:
    rx = re.compile(pattern[3:]) if pattern.startswith("re:") else None
    return any(rx.fullmatch(n) if rx else n == pattern for n in names)


def _recording_awq():
    """llm-compressor's AWQModifier, keeping past its finalize what it resolved and smoothed (it
    reports skipped smoothing only in log lines, which LLM_COMPRESSOR_LOG_DISABLED silences)."""
    from llmcompressor.modifiers.transform import AWQModifier
    from pydantic import PrivateAttr

    class RecordingAWQModifier(AWQModifier):
        _qcompare_smoothed: list = PrivateAttr(default_factory=list)
        _qcompare_added: dict = PrivateAttr(default_factory=dict)  # balance layers with_every_reader added

        def _log_error_metrics(self):  # on_finalize clears _error_metrics right after this
            self._qcompare_smoothed = [m["layer_name"] for m in self._error_metrics]
            super()._log_error_metrics()

        def skipped(self, model) -> list[str]:
            """Every layer a mapping names as smoothing layer that was not smoothed."""
            wanted = [n for mapping in self.mappings for n, _ in model.named_modules()
                      if _matches_any([n], mapping.smooth_layer)]
            done = set(self._qcompare_smoothed)
            return [n for n in dict.fromkeys(wanted) if n not in done]

    return RecordingAWQModifier


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
    watch = checks.FunctionWatch(model) if recorded else None  # what the float model computed before smoothing
    with context.progress.task(f"{quantizer} calibration ({len(dataset)} samples)"), \
            llmcompressor_workarounds(model):
        oneshot(model=model, dataset=dataset, recipe=modifiers, processor=context.tokenizer,
                num_calibration_samples=len(dataset), max_seq_length=params.calibration_length,
                shuffle_calibration_samples=False)
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


def smoothing_preserves_function(model: nn.Module, watch, mappings, context) -> None:
    """The smoothed float model (oneshot's on-the-fly rounding off) computes what the model computed before
    AWQ: each smoothing layer's output is divided by the scales its balance layers' weights were multiplied
    by, so only the smoothing layers' own outputs may move. A mapping that leaves out a layer reading a
    smoothed output (a shared expert beside the routed ones) fails the cell, naming it."""
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    smoothing = [n for n, _ in model.named_modules() if any(_matches_any([n], m.smooth_layer) for m in mappings)]
    model.apply(disable_quantization)
    try:
        context.checks["transform"] = watch.verdict(model, checks.dtype_tolerance(model), "AWQ's smoothing",
                                                    may_change=smoothing)
    except checks.CheckFailed as e:
        context.checks["transform"] = e.check
        raise
    finally:
        model.apply(enable_quantization)


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
