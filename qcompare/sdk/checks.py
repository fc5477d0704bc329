"""The checks that guard a cell's result, run at its phase boundaries for every quantizer.

A check measures, records what it measured in the cell's record (``checks``), and raises
``CheckFailed`` — one line saying what is wrong — when the result cannot be trusted, so the
cell fails instead of storing numbers that look fine. ``qcompare.testing`` runs the same
functions on tiny models, so a plugin author's tests and the runner agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcompare.errors import QcompareError

PROBE_SHAPE = (2, 16)  # sequences x tokens of the fixed probe batch
# Default tolerance of fake ≡ converted, relative to the largest probe logit, by the dtype the
# model computes in: a few units in the last place (a quantizer that is exact declares 0).
DTYPE_RTOL = {"torch.float32": 1e-5, "torch.float64": 1e-9, "torch.bfloat16": 2e-2, "torch.float16": 4e-3}


class CheckFailed(QcompareError):
    """A cell's result failed one of the runner's checks; ``check`` holds what was measured."""

    def __init__(self, message: str, name: str, check: dict):
        super().__init__(message)
        self.name, self.check = name, check


def probe_ids(model):
    """A fixed batch of token ids inside the model's vocabulary (the same for every cell)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    return ids.to(_device(model))


def _device(model):
    return next(p.device for p in model.parameters())


def probe_logits(model, ids=None):
    """fp32 logits of ``model`` on the probe batch, in eval mode (the mode it is left in is kept)."""
    import torch

    ids = probe_ids(model) if ids is None else ids
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(ids.to(_device(model))).logits.float().cpu()
    finally:
        model.train(training)


def model_dtype(model):
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@dataclass
class Comparison:
    """Two models' logits on the probe batch: the largest difference and top-1 agreement."""

    max_abs_diff: float
    top1_agreement: float
    scale: float  # the largest |logit| of the reference

    @classmethod
    def of(cls, reference, other, argmax=None, scale: float | None = None) -> "Comparison":
        """The one comparison of logits every check makes. ``argmax``: (the reference's, the other's) top-1
        tokens when the logits given are a subset of the vocabulary's columns (a kept fingerprint);
        ``scale``: the reference's largest |logit| when ``reference`` is such a subset."""
        import torch

        scale = float(reference.abs().max()) if scale is None else scale
        if reference.shape != other.shape:
            return cls(float("inf"), 0.0, scale)
        finite = torch.isfinite(other).all()
        top = argmax if argmax is not None else (reference.argmax(-1), other.argmax(-1))
        agree = float((top[0] == top[1]).float().mean()) if top[0].shape == top[1].shape else 0.0
        return cls(float((reference - other).abs().max()) if finite else float("inf"), agree, scale)

    def within(self, rtol: float) -> bool:
        return self.max_abs_diff <= rtol * max(1.0, self.scale)

    def as_dict(self, rtol: float) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "top1_agreement": round(self.top1_agreement, 6),
                "tolerance": rtol * max(1.0, self.scale), "probe_tokens": PROBE_SHAPE[0] * PROBE_SHAPE[1],
                "passed": self.within(rtol)}


def dtype_tolerance(model_or_dtype) -> float:
    """The relative tolerance of two computations of one model in its dtype (a model, a torch dtype, or its
    name as a record stores it): a few units in the last place; 1e-2 for a dtype not in ``DTYPE_RTOL``."""
    dtype = model_or_dtype if isinstance(model_or_dtype, str) else \
        str(model_or_dtype if not hasattr(model_or_dtype, "parameters") else model_dtype(model_or_dtype))
    return DTYPE_RTOL.get(dtype, 1e-2)


def tolerance(quantizer, params, model) -> float:
    """The relative tolerance of fake ≡ converted: the quantizer's own, else the dtype's default."""
    rtol = quantizer.fake_quant_tolerance(params)
    return float(dtype_tolerance(model) if rtol is None else rtol)


def fake_vs_converted(student_logits, model_logits, rtol: float) -> dict[str, Any]:
    """Compare the trained student's probe logits (taken before ``convert``, which may work in
    place) with the converted model's; raise CheckFailed when they differ beyond ``rtol``."""
    comparison = Comparison.of(student_logits, model_logits)
    check = comparison.as_dict(rtol)
    if not check["passed"]:
        exact = "exactly" if rtol == 0 else f"within {check['tolerance']:.3g}"
        raise CheckFailed(
            f"fake ≡ converted failed: the converted model's logits differ from the trained student's by up to "
            f"{comparison.max_abs_diff:.3g} on the probe batch (top-1 agreement {comparison.top1_agreement:.1%}; "
            f"the quantizer promises {exact}): its convert does not compute what its fake quantizer trained",
            "fake_vs_converted", check)
    return check


# --- training reaches the quantized weights ------------------------------------------------


# A straight-through gradient reaches nearly every element of a layer's weight (x^T·δ is dense); one
# that stops at the rounding still reaches the elements its scale is computed from (one per group).
REACHED_SHARE = 0.5


class TrainingWatch:
    """Watches a student while a distiller trains it: has each layer of the body (each weight a quantizer
    may put on a grid, found in the teacher) received a gradient on at least half of its elements in some
    backward pass, and has it moved by the end?

    A fake quantizer without a straight-through gradient, or one that freezes the weights it rounds,
    leaves a distiller training only norms, embeddings and head; the distilled row would then equal PTQ
    and read as "distillation does not help". Installed before ``distill`` (a gradient hook per weight
    that stops looking once a gradient reached it, and a fingerprint of each weight); ``verdict``
    after it. A LoRA distiller trains adapters instead of the base weights: then each adapted layer's
    ``lora_B`` (zero at start) must have left zero.

    A layer the loss cannot reach whatever the quantizer is listed (``unreachable``), not failed: one the
    model's own code only runs without gradients (a ``torch.no_grad`` forward), or whose output stays in
    the autograd graph but never receives a gradient (a sparse-attention indexer whose scores only choose
    tokens through ``topk``). A layer whose own forward left the graph (a fake quantizer that cut it) still
    fails, and so does every layer when none received a gradient at all."""

    def __init__(self, teacher, student, adapters: bool):
        import torch

        from qcompare.sdk.targets import find_targets

        self.adapters = adapters
        head = teacher.get_output_embeddings()
        paths = [t.name for t in find_targets(teacher, kinds=("linear", "conv1d", "experts"))
                 if t.module is not head]
        self.layers: dict[str, list[tuple[str, Any]]] = {}
        for path in dict.fromkeys(paths):
            try:
                module = student.get_submodule(path)
            except AttributeError:
                continue
            self.layers[path] = [(n, p) for n, p in module.named_parameters() if "lora_" not in n]
        self.reached: set[str] = set()
        self.in_graph: set[str] = set()  # layers whose output required a gradient in some forward
        self.output_reached: set[str] = set()  # ... and received one
        self.ran: set[str] = set()  # layers that ran a forward
        self.ran_with_grad: set[str] = set()  # ... with gradients on (outside the model's no_grad code)
        self.handles = []
        self.before: dict[str, list[tuple[float, float]]] = {}
        if adapters:
            return
        with torch.no_grad():
            for path, params in self.layers.items():
                self.before[path] = [tensor_fingerprint(p) for _, p in params]
                for _, p in params:
                    if p.requires_grad:
                        self.handles.append(p.register_post_accumulate_grad_hook(self._hook(path)))
                self.handles.append(student.get_submodule(path).register_forward_hook(self._output_hook(path)))

    def _hook(self, path: str):
        def hook(p):
            if path not in self.reached and p.grad is not None and \
                    int(p.grad.count_nonzero()) >= REACHED_SHARE * p.grad.numel():
                self.reached.add(path)
        return hook

    def _output_hook(self, path: str):
        import torch

        def reached(grad):
            if grad is not None and bool(grad.count_nonzero()):
                self.output_reached.add(path)

        def hook(module, args, out):
            if path in self.output_reached:
                return
            self.ran.add(path)
            if torch.is_grad_enabled():
                self.ran_with_grad.add(path)
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, torch.Tensor) and out.requires_grad:
                self.in_graph.add(path)
                out.register_hook(reached)
        return hook

    def verdict(self, student) -> dict[str, Any]:
        """What was measured (``layers``, ``reached``, ``moved``); CheckFailed naming the layers that were
        not trained."""
        import torch

        for h in self.handles:
            h.remove()
        self.handles = []
        if self.adapters:
            adapted = {}
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    adapted.setdefault(name.split(".lora_B")[0], []).append(p)
            moved = [k for k, ps in adapted.items() if any(bool(p.detach().count_nonzero()) for p in ps)]
            still = [k for k in adapted if k not in moved]
            check = {"trained": "LoRA adapters", "layers": len(adapted), "moved": len(moved), "passed": not still}
            if still:
                raise CheckFailed(f"training: {len(still)} of {len(adapted)} LoRA adapters never left their initial "
                                  f"zero (e.g. {still[0]}): no gradient reached them, or the learning rate stayed 0 "
                                  "(a warm-up as long as the run?)", "training", check)
            return check
        with torch.no_grad():
            moved = {path for path, params in self.layers.items()
                     if any(tensor_fingerprint(p) != was for (_, p), was in zip(params, self.before[path]))}
        frozen = [path for path, params in self.layers.items() if not any(p.requires_grad for _, p in params)]
        unreachable = [path for path in self.layers if self.reached and path not in self.reached and path not in frozen
                       and ((path in self.in_graph and path not in self.output_reached)
                            or (path in self.ran and path not in self.ran_with_grad))]
        unreached = [path for path in self.layers if path not in self.reached and path not in frozen
                     and path not in unreachable]
        still = [path for path in self.layers if path not in moved and path not in unreachable]
        check = {"trained": "weights", "layers": len(self.layers), "reached": len(self.reached), "moved": len(moved),
                 "unreachable": unreachable, "passed": not (frozen or unreached or still)}
        if frozen or unreached or still:
            if frozen:
                why = f"{len(frozen)} of {len(self.layers)} layers of the body are frozen (e.g. {frozen[0]})"
            elif unreached:
                why = (f"{len(unreached)} of {len(self.layers)} layers of the body never received a gradient on "
                       f"{REACHED_SHARE:.0%} of their weights (e.g. {unreached[0]}): the fake quantizer does not pass "
                       "gradients straight through")
            else:
                why = (f"{len(still)} of {len(self.layers)} layers of the body did not move (e.g. {still[0]}): the "
                       "learning rate stayed 0 (a warm-up as long as the run?)")
            raise CheckFailed(f"training: {why}; the distiller trained only what is left, so this cell's numbers "
                              "would read as distillation that does not help", "training", check)
        return check


# --- the teacher is left as it was ---------------------------------------------------------


def tensor_fingerprint(t) -> tuple[float, float]:
    """Sum and Euclidean norm of ``t``, accumulated in float64 (no float64 copy of ``t``): enough to notice
    any write into it."""
    import torch

    with torch.no_grad():
        x = t if t.is_floating_point() else t.double()  # integer codes: their (small) copy
        return float(x.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(x, dtype=torch.float64))


def weights_fingerprint(model) -> dict[str, tuple[float, float]]:
    """``tensor_fingerprint`` of each floating-point parameter and buffer of ``model``."""
    return {name: tensor_fingerprint(t) for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point()}


def teacher_unchanged(teacher, before: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """CheckFailed when ``teacher``'s weights differ from ``before`` (``weights_fingerprint``): the teacher is
    shared by every cell of the process, and one that a quantizer or distiller wrote into (a LoRA distiller
    that forgot to unshare a trainable weight, a quantizer that declares ``shares_teacher_weights`` and
    rounds in place) would change every later cell's numbers."""
    after = weights_fingerprint(teacher)
    changed = [name for name, was in before.items() if after.get(name) != was]
    check = {"tensors": len(before), "changed": changed[:20], "passed": not changed}
    if changed:
        raise CheckFailed(f"teacher: this cell wrote into the teacher it shares with the run's other cells ({len(changed)} "
                          f"tensors, e.g. {changed[0]}); it is reloaded for the cells after this one", "teacher", check)
    return check


# --- a transformation before rounding keeps the function ------------------------------------------


class FunctionWatch:
    """What a float model computes before a transformation that must not change it (AWQ's smoothing, a
    rotation, any plugin's pre-rounding transform), module by module on the probe batch, to hold the
    transformed model to: ``FunctionWatch(model)`` before, ``watch.verdict(model, rtol, what)`` after.

    ``may_change`` names the modules whose own output the transformation rescales by design (AWQ's
    smoothing layers: a norm, ``v_proj``, ``up_proj``); every other module both models have by that name is
    compared, by the largest difference of its output relative to the output's largest value. A module
    the transformation replaced (experts split into one Linear each) is compared where its name is kept."""

    def __init__(self, model, ids=None):
        self.ids = probe_ids(model) if ids is None else ids
        self.before = module_outputs(model, self.ids)

    def verdict_into(self, record: dict, key: str, model, rtol: float, what: str, may_change=()) -> None:
        """``verdict``, with its check stored as ``record[key]`` whether it passes or fails (a plugin's
        ``context.checks``: the cell's record keeps what was measured when the cell fails)."""
        try:
            record[key] = self.verdict(model, rtol, what, may_change)
        except CheckFailed as e:
            record[key] = e.check
            raise

    def verdict(self, model, rtol: float, what: str, may_change=()) -> dict[str, Any]:
        """CheckFailed naming the first module whose output moved beyond ``rtol`` (and how many did)."""
        after = module_outputs(model, self.ids)
        skip = set(may_change)
        moved, worst, compared = [], 0.0, 0
        for name, outputs in self.before.items():  # in the order the modules finished: causes first
            if name in skip or name not in after or len(after[name]) != len(outputs):
                continue
            compared += 1
            rel = max(_relative(a, b) for a, b in zip(outputs, after[name]))
            worst = max(worst, rel)
            if rel > rtol:
                moved.append((name or "the model's logits", rel))
        check = {"what": what, "modules": compared, "max_rel_diff": worst, "tolerance": rtol,
                 "moved": [{"module": n, "rel_diff": r} for n, r in moved[:20]], "passed": not moved}
        if moved:
            first, rel = moved[0]
            raise CheckFailed(
                f"{what} changed what the float model computes before any rounding: {first}'s output moves by "
                f"{rel:.2g} of its largest value (tolerance {rtol:.2g}; {len(moved) - 1} more modules moved after it)",
                "transform", check)
        return check


def _relative(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    return diff / scale if scale > 0 else diff


def first_tensor(out):
    """A module's output tensor: itself, or the first tensor of a tuple or list (None if it has none)."""
    import torch

    if torch.is_tensor(out):
        return out
    return next((o for o in out if torch.is_tensor(o)), None) if isinstance(out, (tuple, list)) else None


def module_outputs(model, ids) -> dict[str, list]:
    """Each module's output (its first tensor) on ``ids``, in fp32 on the CPU, keyed by module name in the
    order the modules finished ("" is the model: its logits); a module called more than once keeps each."""
    import torch

    outputs: dict[str, list] = {}

    def keep(name):
        def hook(module, args, out):
            first = getattr(out, "logits", None) if not name else None
            first = first_tensor(out) if first is None else first
            if first is not None:
                outputs.setdefault(name, []).append(first.detach().float().cpu())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(ids.to(_device(model)))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return outputs


# --- coverage ----------------------------------------------------------------------------

DEFAULT_MIN_COVERAGE = 0.95  # of the body's weights (all but embeddings and head)


def expected_on_grid(teacher, quantizer, params) -> list[str]:
    """The body's Linear-like weights (Linear, Conv1D, fused experts; not the head, embeddings or routers)
    that ``quantizer`` must put on a grid: all but those its ``skip`` parameter names (the recipe's, where
    the quantizer has one) or its ``kept_float`` declares."""
    from qcompare.sdk.targets import find_targets

    head, embeddings = teacher.get_output_embeddings(), teacher.get_input_embeddings()
    kinds = ("linear", "conv1d", "experts")
    return [t.qualified for t in find_targets(teacher, _left_float(quantizer, params), kinds)
            if t.module is not head and t.module is not embeddings]


def _left_float(quantizer, params) -> list[str]:
    """The skip patterns of a quantizer's choice: its ``skip`` parameter (the recipe's) and its ``kept_float``."""
    return [*(getattr(params, "skip", None) or ()), *quantizer.kept_float(params)]


def coverage_in_reach(teacher, quantizer, params, minimum: float) -> None:
    """Refuse, before anything runs, a model whose body keeps more than ``1 - minimum`` of its weights where
    no quantizer can reach them: in layers of no kind ``qcompare.sdk.targets`` finds (Aria's grouped GEMM
    experts, a Mamba ``nn.Conv1d``, hyper-connection mixers) or named by ``skip`` and the quantizer's
    ``kept_float``. Every weight of a kind a format may take counts as reached (routers and embeddings
    included), so it refuses no model that the coverage check after convert would pass with a quantizer
    of these kinds; for a quantizer that sets ``reaches_other_kinds`` every weight of two or more dimensions
    counts as reached, so only what ``skip`` and ``kept_float`` leave float is held here. Raises QcompareError
    (one line); works on the meta-device model ``qcompare validate`` builds."""
    from qcompare.sdk.footprint import planned
    from qcompare.sdk.targets import KINDS, find_targets, skipped

    left = _left_float(quantizer, params)
    if quantizer.reaches_other_kinds:  # any weight of two or more dimensions may end on its grid, but skip holds
        reach = {n for n, p in teacher.named_parameters()
                 if p.ndim >= 2 and not skipped(n.rpartition(".")[0], left) and not skipped(n, left)}
    else:
        reach = {t.qualified for t in find_targets(teacher, left, kinds=KINDS)}
    plan = planned(teacher, reach)
    if plan.body_coverage < minimum:
        raise QcompareError(
            f"coverage: at most {plan.body_coverage:.0%} of the body's weights can end on a grid (minimum "
            f"{minimum:.0%}); out of reach: {plan.float_summary()} (layers of no kind a quantizer finds, or named in "
            "skip) — lower min_coverage for this quantizer in the recipe if that is the study")


def takes_layout(model, quantizer, params, minimum: float) -> None:
    """What ``qcompare validate`` asks of one quantizer choice on a model's layout (the meta-device model, or a
    real one): enough of the body within reach (``coverage_in_reach``), then the quantizer's own
    ``check_model`` on a copy. Raises QcompareError (one line)."""
    import copy

    coverage_in_reach(model, quantizer, params, minimum)
    quantizer.check_model(copy.deepcopy(model), params)


def coverage(footprint, minimum: float, expected: list[str] | None = None) -> dict[str, Any]:
    """Which weights ended on a low-bit grid; CheckFailed when the body's share is below ``minimum``, or
    when a weight of ``expected`` (``expected_on_grid``) stayed float — one projection left in float is
    a few percent of the body and passes any share, so it is checked by name."""
    from qcompare.sdk.footprint import coverage_problem

    on_grid = {w.name for w in footprint.weights if w.quantized}
    left = [name for name in expected or () if name not in on_grid]
    check = {"body": round(footprint.body_coverage, 6), "model": round(footprint.model_coverage, 6),
             "minimum": minimum, "float_in_body": {g: round(s, 6) for g, s in footprint.float_groups().items()},
             "left_in_float": left, "passed": footprint.body_coverage >= minimum and not left}
    problem = coverage_problem(footprint, minimum)
    if problem:
        raise CheckFailed(problem, "coverage", check)
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise CheckFailed(f"coverage: {len(left)} Linear-like weights of the body stayed float that neither the "
                          f"recipe's skip nor the quantizer names: {shown} — quantize them, or add them to skip",
                          "coverage", check)
    return check


# --- groups run along the input features ----------------------------------------------------

GRID_ROWS = 4096  # rows of each weight looked at (evenly spaced): enough to see a wrong axis, cheap at 4B


def input_rows(module, weight, transposed: bool = False):
    """``weight`` (one of ``module``'s, or a tensor in its place) as rows of input features: a Linear's
    (out, in) as it is, a Conv1D's (in, out) transposed, an embedding's (vocab, dim) as it is, and a fused
    experts weight (E, out, in) — or, ``transposed``, (E, in, out) — as (E·out, in)."""
    from qcompare.sdk.targets import _conv1d_class

    conv1d = _conv1d_class()
    if weight.ndim == 2:
        return weight.t() if conv1d is not None and isinstance(module, conv1d) else weight
    return (weight.transpose(1, 2) if transposed else weight).reshape(-1, weight.shape[1 if transposed else 2])


def most_levels(rows, group: int) -> int:
    """The most distinct values any ``group`` consecutive entries of a row hold (0: a whole row)."""
    import torch

    group = group or rows.shape[1]
    if rows.shape[1] % group:
        group = rows.shape[1]
    step = max(1, rows.shape[0] // GRID_ROWS)
    chunks = rows[::step].detach().float().reshape(-1, group).sort(dim=-1).values
    return int(((chunks[:, 1:] != chunks[:, :-1]).sum(-1) + 1).max()) if chunks.numel() else 0


def groups_along_inputs(teacher, student, levels: int, group: int) -> dict[str, Any]:
    """Every rounded weight of the trained student holds at most ``levels`` distinct values in each
    ``group`` consecutive input features of a row (0: the whole row), as a grid of that many levels with
    one scale per group does. Which axis is the input is observed from what the float model's forward
    multiplies (``observe_expert_layouts``), not read from how a weight is stored; groups that run along
    another axis hold values of several scales and fail the cell. A group no wider than ``levels``
    cannot tell (recorded as ``undecidable``). The rounded weights are those the SDK's fake-quantizer
    contract names (``qcompare.sdk.fake``) and those a torch parametrization computes."""
    import torch

    from qcompare.sdk.fake import rounded_weights, weight_quantizers
    from qcompare.sdk.targets import observe_expert_layouts

    layouts = observe_expert_layouts(teacher)  # {experts module: (E, in, out)?}, from what the forward multiplies
    peft_prefix = "base_model.model."
    worst: dict[str, int] = {}
    checked = 0
    with torch.no_grad():
        for name, module in student.named_modules():
            rounded = rounded_weights(module) if weight_quantizers(module) else {}
            parametrized = getattr(module, "parametrizations", None) or {}
            rounded.update({param: getattr(module, param) for param in parametrized if param not in rounded})
            plain = name[len(peft_prefix):] if name.startswith(peft_prefix) else name
            for param, w in rounded.items():
                rows = input_rows(module, w, layouts.get(plain, False))
                checked += 1
                found = most_levels(rows, group)
                if found > levels:
                    worst[f"{plain}.{param}"] = found
    decidable = (group or 10**9) > levels
    check = {"levels": levels, "group": group, "weights": checked, "undecidable": not decidable,
             "across_groups": worst, "passed": not worst}
    if worst:
        name, found = max(worst.items(), key=lambda kv: kv[1])
        more = f" (and {len(worst) - 1} more weights)" if len(worst) > 1 else ""
        width = f"{group} consecutive input features" if group else "a row of input features"
        raise CheckFailed(f"grid: the quantizer's groups do not run along the input features: {name} holds up to "
                          f"{found} distinct values in {width}, where a grid of {levels} levels with one scale per "
                          f"group holds at most {levels}{more}", "grid", check)
    return check


# --- a saved folder ships what the converted model holds -----------------------------------

SAVED_SIZE_RTOL = 0.10  # headers, shape tensors, a format's own small tables


def saved_size(folder, size: dict[str, Any]) -> dict[str, Any]:
    """The tensor bytes a saved folder ships (every ``*.safetensors`` file) against the converted model's
    true size (``size["packed_bytes"]``: codes at the format's width) and what it holds in memory (codes
    as held, which a format may ship unpacked): CheckFailed when the folder ships more than both, or less
    than either, by over ``SAVED_SIZE_RTOL`` — a folder of dequantized weights, say, whose model card
    would claim the true size."""
    from qcompare.sdk.saving import tensor_bytes

    on_disk = sum(tensor_bytes(folder).values())
    true, memory = size["packed_bytes"], size.get("memory_bytes") or size["packed_bytes"]
    low, high = (1 - SAVED_SIZE_RTOL) * min(true, memory), (1 + SAVED_SIZE_RTOL) * max(true, memory)
    n = size.get("parameters")
    check = {"saved_bytes": on_disk, "true_bytes": true, "memory_bytes": memory,
             "saved_bits_per_weight": 8 * on_disk / n if n else None, "ratio_to_true": on_disk / true if true else None,
             "tolerance": SAVED_SIZE_RTOL, "passed": low <= on_disk <= high}
    if not check["passed"]:
        raise CheckFailed(
            f"saved size: the folder ships {on_disk:,} bytes of tensors, {on_disk / true:.2f}× the converted model's "
            f"true size ({true:,} bytes; {memory:,} held in memory; allowed ±{SAVED_SIZE_RTOL:.0%}): "
            + ("it ships more than the model holds (dequantized or float weights?)" if on_disk > high
               else "it ships less than the model holds (weights missing?)"), "saved_size", check)
    return check


# --- a saved model reloads as the evaluated one ------------------------------------------

FINGERPRINT_COLUMNS = 512  # vocabulary columns of the probe logits a cell keeps


@dataclass
class Fingerprint:
    """A model's probe logits, small enough to keep with every cell: the logits at a fixed sample
    of vocabulary columns, the full-vocabulary argmax and largest |logit| at each position."""

    ids: Any
    columns: Any
    logits: Any
    argmax: Any
    scale: float

    @classmethod
    def of(cls, model, logits=None) -> "Fingerprint":
        import torch

        ids = probe_ids(model).cpu()
        logits = probe_logits(model, ids) if logits is None else logits
        vocab = logits.shape[-1]
        if vocab <= FINGERPRINT_COLUMNS:
            columns = torch.arange(vocab)
        else:
            columns = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:FINGERPRINT_COLUMNS].sort().values
        return cls(ids, columns, logits[..., columns].contiguous(), logits.argmax(-1), float(logits.abs().max()))

    def compare(self, model) -> Comparison:
        logits = probe_logits(model, self.ids)
        if logits.shape[-1] <= int(self.columns.max()):
            return Comparison(float("inf"), 0.0, self.scale)
        return Comparison.of(self.logits, logits[..., self.columns], (self.argmax, logits.argmax(-1)), self.scale)

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({"ids": self.ids, "columns": self.columns, "logits": self.logits, "argmax": self.argmax},
                  str(path), metadata={"scale": repr(self.scale)})

    @classmethod
    def load(cls, path) -> "Fingerprint":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            scale = float(f.metadata()["scale"])
        return cls(tensors["ids"], tensors["columns"], tensors["logits"], tensors["argmax"], scale)


# Run in a fresh Python (``fresh.run``): the folder is loaded by exactly the code its model card shows
# (nothing this process has imported or patched can help it), then its probe logits are written for comparison.
_RELOAD = """\
import json, sys
import torch
from safetensors.torch import load_file, save_file
jobs = json.loads(sys.argv[1])
for job in jobs:
    stage = "load"
    try:
        scope = {}
        exec(job["code"], scope)
        model = scope["model"].eval()
        if job["device"] != "cpu":
            model = model.to(job["device"])
        stage = "forward"
        probe = load_file(job["probe"])
        with torch.no_grad():
            logits = model(probe["ids"].to(job["device"])).logits.float().cpu()
        save_file({"logits": logits[..., probe["columns"]].contiguous(), "argmax": logits.argmax(-1)}, job["out"])
        print("QCOMPARE-RELOAD", json.dumps({"folder": job["folder"], "ok": True}), flush=True)
    except Exception as e:
        line = (str(e).strip().splitlines() or [""])[0][:300]
        print("QCOMPARE-RELOAD", json.dumps({"folder": job["folder"], "ok": False, "stage": stage,
                          "error": f"{type(e).__name__}: {line}"}), flush=True)
"""


def reload(folder, fingerprint: Fingerprint, rtol: float, device: str = "cpu") -> dict[str, Any]:
    """Load ``folder`` in a fresh Python (``qcompare.sdk.fresh``) exactly as its model card tells a user to, and
    compare its probe logits with the evaluated model's; CheckFailed if it does not load, fails
    its forward pass, or loads as another model."""
    result = reload_all([(folder, fingerprint)], rtol, device)[0]
    if isinstance(result, CheckFailed):
        raise result
    return result


def reload_all(items: list, rtol: float, device: str = "cpu") -> list:
    """``reload`` for several (folder, fingerprint) pairs, a check dict or a CheckFailed for each.
    Folders that need ``qcompare.compat`` and folders that do not load in separate processes, so
    one never lends the other its patches."""
    import json
    import os
    import sys
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from qcompare.sdk import fresh
    from qcompare.sdk.saving import load_code, needs_compat

    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qcompare-reload-") as scratch:
        for compat in (False, True):
            jobs = []
            for i, (folder, fingerprint) in enumerate(items):
                if needs_compat(folder) != compat:
                    continue
                probe, out = Path(scratch) / f"probe-{i}.safetensors", Path(scratch) / f"logits-{i}.safetensors"
                fingerprint.save(probe)
                jobs.append({"index": i, "folder": str(folder), "code": "\n".join(load_code(folder, str(folder))),
                             "probe": str(probe), "out": str(out), "device": device})
            if not jobs:
                continue
            # a fresh interpreter on this one's import path: a plugin that loads its own format is found
            # where this process found it (installed, or put on the path by a test or a notebook)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            _, output = fresh.run(_RELOAD, [json.dumps(jobs)], env, Path(scratch) / f"log-{int(compat)}.txt")
            lines = output.splitlines()
            reports = {r["folder"]: r for r in (json.loads(line.split(" ", 1)[1]) for line in lines
                                                if line.startswith("QCOMPARE-RELOAD "))}
            for job in jobs:
                report = reports.get(job["folder"])
                if report is None:  # the process itself died (out of memory, a crash in native code)
                    tail = ([line for line in lines if line.strip() and not line.startswith("QCOMPARE-RELOAD ")]
                            or ["no output"])[-1][:300]
                    report = {"ok": False, "stage": "load", "error": tail}
                results[job["index"]] = _judge(report, job, items[job["index"]][1], rtol, load_file)
    return [results[i] for i in range(len(items))]


def _judge(report: dict, job: dict, fingerprint: Fingerprint, rtol: float, load_file):
    if not report["ok"]:
        if report["stage"] == "load":
            loader = "qcompare.load_pretrained" if "qcompare.load_pretrained" in job["code"] \
                else "AutoModelForCausalLM.from_pretrained"
            what = f"does not load with the model card's code ({loader})"
        else:
            what = "loads, but its forward pass fails"
        return CheckFailed(f"reload: the saved folder {what} ({report['error']})", "reload",
                           {"passed": False, "error": report["error"]})
    got = load_file(job["out"])
    comparison = Comparison.of(fingerprint.logits, got["logits"], (fingerprint.argmax, got["argmax"]), fingerprint.scale)
    check = comparison.as_dict(rtol)
    if not check["passed"]:
        return CheckFailed(
            f"reload: the saved folder loads as a different model: its logits differ from the evaluated model's "
            f"by up to {comparison.max_abs_diff:.3g} on the probe batch (top-1 agreement "
            f"{comparison.top1_agreement:.1%}; allowed {check['tolerance']:.3g})", "reload", check)
    return check
