"""One cell as explicit phases, the same for ``qcompare run``, ``qcompare export`` and every executor.

::

    inputs (loaded before the first phase, never changed by one): teacher, tokenizer, data,
    handed to each plugin call once, in its CellContext (the teacher as a fresh view per phase)
      prepare    quantizer.prepare(copy of the teacher)              -> student (fake-quantized)
      distill    distiller.distill(student)                          -> trained student, log, cost
      convert    quantizer.convert(trained student)                  -> model (real low-bit weights)
      evaluate   every evaluator on the model                        -> metrics, stderr, items
      save       quantizer.save (+ LoRA adapter), tokenizer          -> a Hugging Face folder

Work that belongs between phases for every plugin (timing, memory, the checks of a result)
is called here, at the boundary, and nowhere else; see docs/phases.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompare.sdk import checks, footprint
from qcompare.sdk.api import CellContext, EvalResult
from qcompare.engine.cells import Cell
from qcompare.errors import QcompareError, error_line
from qcompare.sdk.registry import Registry

# the phases whose plugin calls get a context (and so a view of the teacher of their own)
PLUGIN_PHASES = ("prepare", "distill", "convert", "evaluate", "save")


@dataclass(frozen=True)
class CellInputs:
    """What a cell's phases read and never change: loaded once per process, shared by its cells."""

    teacher: Any
    tokenizer: Any
    data: Any = None  # datasets.Dataset with a ``messages`` column, or None


class InputCache:
    """Teachers and training data, loaded once per process (one model in memory at a time). A model or
    dataset that cannot be loaded fails once: every later cell that needs it fails at once with the same
    line, instead of each retrying (a hub out of reach costs its retries once, not once per cell)."""

    def __init__(self, registry: Registry, device: str):
        self.registry, self.device = registry, device
        self._models: dict[str, tuple] = {}
        self._data: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    def _once(self, key: str, load):
        if key in self._failed:
            raise QcompareError(self._failed[key])
        try:
            return load()
        except Exception as e:
            self._failed[key] = error_line(e) + " (failed once in this run; not tried again for later cells)"
            raise

    def teacher(self, name: str) -> tuple:
        from qcompare.engine.inputs import load_model

        if name not in self._models:
            loaded = self._once(f"model {name}", lambda: load_model(name, self.registry, self.device))
            self._models.clear()
            self._models[name] = loaded
        return self._models[name]

    def data(self, spec) -> Any:
        from qcompare.engine.inputs import load_training_data

        key = spec.model_dump_json()
        if key not in self._data:
            self._data[key] = self._once(f"data {key}", lambda: load_training_data(spec, self.registry))
        return self._data[key]

    def forget(self, name: str) -> None:
        """Drop the loaded model ``name`` (a cell changed it): the next cell that needs it loads it anew."""
        self._models.pop(name, None)

    def inputs(self, cell: Cell, data_spec) -> CellInputs:
        teacher, tokenizer = self.teacher(cell.model)
        # the teacher row trains nothing: its data is never read, so never loaded
        return CellInputs(teacher, tokenizer, None if cell.is_teacher else self.data(data_spec))


def weight_sharing_copy(model):
    """A copy of ``model``'s module tree whose weights are the same memory (nothing new allocated).

    Parameters and buffers are new tensor objects over the original storage, so rebinding
    them in the copy (``.to(dtype)``, ``requires_grad_``, swapping a module) leaves the
    original alone; only in-place writes reach it. Tied weights stay tied (one alias each)."""
    from torch import nn

    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def student_copy(teacher, quantizer, distiller, dparams) -> tuple[Any, str]:
    """The copy of the teacher that ``prepare`` turns into the student, and how it was made.

    One copy of the weights instead of two when neither step writes into them: the quantizer
    says ``prepare``/``convert`` leave them (torchao QAT) and the distiller says training
    leaves them (LoRA). Otherwise (GPTQ/AWQ, full fine-tuning) a deep copy."""
    if quantizer.shares_teacher_weights and distiller.keeps_base_weights(dparams):
        return weight_sharing_copy(teacher), "shared"
    return copy.deepcopy(teacher), "copied"


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (kB on Linux)


@dataclass
class Outcome:
    """What one cell produced, for the runner to store."""

    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    group_weighting: dict[str, str] = field(default_factory=dict)
    items: dict[str, Any] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    size: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    fingerprint: Any = None  # the converted model's probe logits (checks.Fingerprint), kept with the cell
    notes: dict[str, Any] = field(default_factory=dict)
    save_error: str | None = None


class CellPipeline:
    """The phases of one cell. Build it with the cell's inputs and context, then ``run`` it
    (or call the phases one by one, as ``qcompare export`` does to rebuild a model)."""

    def __init__(self, cell: Cell, inputs: CellInputs, context: CellContext, registry: Registry,
                 evaluators: list = ()):
        self.cell, self.inputs, self.context = cell, inputs, context
        self.cost: dict[str, Any] = {}
        self.checks: dict[str, Any] = context.checks  # what the checks (the plugins' too) measured, kept when one fails
        self.size: dict[str, Any] = {}
        self.fingerprint = None
        if not cell.is_teacher:
            qcls = registry.get("quantizer", cell.quantizer.name)
            dcls = registry.get("distiller", cell.distiller.name)
            self.quantizer, self.qparams = qcls(), qcls.Params.model_validate(cell.quantizer.params)
            self.distiller, self.dparams = dcls(), dcls.Params.model_validate(cell.distiller.params)
            self.min_coverage = cell.quantizer.min_coverage if cell.quantizer.min_coverage is not None \
                else checks.DEFAULT_MIN_COVERAGE
        self.evaluators = []
        for choice in evaluators:
            ecls = registry.get("evaluator", choice.name)
            self.evaluators.append((ecls(), ecls.Params.model_validate(choice.params)))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase into the cell's cost as ``<name>_seconds`` (added up if it runs twice), and yield
        the context its plugin calls get: the cell's, with a fresh view of the teacher (same memory,
        its own module objects), so whatever a plugin rebinds on it (accelerate's autocast forward
        under bf16, .to(), train mode) ends with the phase instead of leaking into the next cells."""
        self.context.progress.phase(name)
        teacher = self.inputs.teacher
        context = dataclasses.replace(self.context, teacher=weight_sharing_copy(teacher)) \
            if teacher is not None and name in PLUGIN_PHASES else self.context
        start = time.perf_counter()
        try:
            yield context
        finally:
            key = f"{name}_seconds"
            self.cost[key] = self.cost.get(key, 0.0) + time.perf_counter() - start

    # --- the phases ------------------------------------------------------------------

    def prepare(self):
        """A copy of the teacher, fake-quantized by the quantizer: the trainable student."""
        from transformers import set_seed

        set_seed(self.cell.seed if self.cell.seed is not None else 0)  # the same RNG state on every path
        with self.phase("prepare") as context:
            student, self.cost["student_weights"] = student_copy(self.inputs.teacher, self.quantizer,
                                                                 self.distiller, self.dparams)
            return self.quantizer.prepare(student, self.qparams, context)

    def distill(self, student):
        """Train the student (the distiller's inputs are in its context)."""
        # a distiller that trains (it is seeded) must reach the weights the quantizer rounds
        watch = checks.TrainingWatch(self.inputs.teacher, student, self.distiller.keeps_base_weights(self.dparams)) \
            if self.distiller.seeded else None
        with self.phase("distill") as context:
            result = self.distiller.distill(student, self.dparams, context)
        self.cost.update(result.cost)
        if watch is not None:
            with self.phase("check"):
                self._check("training", watch.verdict, result.student)
        return result

    def convert(self, student):
        """The real low-bit model made from the trained student."""
        with self.phase("convert") as context:
            return self.quantizer.convert(student, self.qparams, context)

    def evaluate(self, model) -> EvalResult:
        """Every evaluator on ``model``; their metrics merged (a metric reported twice is an error)."""
        merged = EvalResult()
        with self.phase("evaluate") as context:
            if model is self.inputs.teacher:  # the teacher's row: the phase's view, so evaluators know it as the teacher
                model = context.teacher
            for evaluator, params in self.evaluators:
                res = evaluator.evaluate(model, params, context)
                for key in res.metrics:
                    if key in merged.metrics:
                        raise QcompareError(f"two evaluators report the metric {key!r}; give them different tasks")
                merged.metrics.update(res.metrics)
                merged.stderr.update(res.stderr)
                merged.items.update(res.items)
                merged.groups.update(res.groups)
                merged.group_weighting.update(res.group_weighting)
        return merged

    def save(self, model, folder: Path) -> None:
        """``model`` as a Hugging Face folder with the tokenizer (and a LoRA adapter beside it)."""
        from qcompare.sdk.saving import save_converted

        with self.phase("save") as context:
            save_converted(self.quantizer, model, self.qparams, folder, context)
            self.inputs.tokenizer.save_pretrained(folder)

    # --- a whole cell ----------------------------------------------------------------

    def build(self):
        """prepare → distill → convert, checked: the cell's model and its training log."""
        student = self.prepare()
        trained = self.distill(student)
        with self.phase("check"):
            # before convert, which may work in place on the student
            grid = self.quantizer.input_groups(self.qparams)
            if grid is not None:
                self._check("grid", checks.groups_along_inputs, self.inputs.teacher, trained.student, *grid)
            student_logits = checks.probe_logits(trained.student)
        model = self.convert(trained.student)
        with self.phase("check"):
            model_logits = checks.probe_logits(model)
            self.fingerprint = checks.Fingerprint.of(model, model_logits)
            self._check("fake_vs_converted", checks.fake_vs_converted, student_logits, model_logits,
                        checks.tolerance(self.quantizer, self.qparams, model))
            measured = footprint.measure(self.inputs.teacher, model, self.quantizer.code_bits(self.qparams))
            self.size = {**measured.as_size(self.quantizer.bits_per_weight(self.qparams)),
                         "dtype": str(checks.model_dtype(model))}
            self._check("coverage", checks.coverage, measured, self.min_coverage,
                        checks.expected_on_grid(self.inputs.teacher, self.quantizer, self.qparams))
        return model, trained.log

    def _check(self, name: str, check, *args):
        try:
            self.checks[name] = check(*args)
        except checks.CheckFailed as e:
            self.checks[name] = e.check
            raise

    def run(self, save_to: Path | None = None) -> Outcome:
        """Every phase of the cell; the model is saved into ``save_to`` if given (and reloaded)."""
        import torch

        device = self.context.device
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        out = Outcome()
        if self.cell.is_teacher:
            from transformers import set_seed

            set_seed(0)
            model = self.inputs.teacher
            dtype_bits = torch.finfo(next(model.parameters()).dtype).bits
            self.size = {**footprint.measure(model, model).as_size(dtype_bits), "dtype": str(checks.model_dtype(model))}
        else:
            before = checks.weights_fingerprint(self.inputs.teacher)
            model, out.log = self.build()
        result = self.evaluate(model)
        if save_to is not None and not self.cell.is_teacher:
            out.save_error = self._save_or_explain(model, save_to)
        if not self.cell.is_teacher:  # after every plugin call: none may have written into the shared teacher
            with self.phase("check"):
                self._check("teacher", checks.teacher_unchanged, self.inputs.teacher, before)
        out.cost = {**self.cost, "total_seconds": time.perf_counter() - clock,
                    "peak_memory_bytes": peak_memory_bytes(device),
                    # CUDA's peak is reset per cell; CPU RSS only ever grows: the process's peak so far
                    "peak_memory_scope": "cell" if device == "cuda" else "process", "device": device}
        out.metrics, out.stderr, out.items, out.groups = result.metrics, result.stderr, result.items, result.groups
        out.group_weighting = result.group_weighting
        out.size, out.checks, out.fingerprint, out.notes = self.size, self.checks, self.fingerprint, self.context.notes
        return out

    def save_checked(self, model, folder: Path) -> None:
        """Save, then reload the folder as its model card says and compare with the evaluated model."""
        from qcompare.engine.card import folder_bytes

        self.save(model, folder)
        with self.phase("check"):
            self._check("reload", checks.reload, folder, self.fingerprint,
                        checks.dtype_tolerance(model), self.context.device)
            try:  # a folder larger than the model it holds still loads: the cell says so, and keeps it
                self.checks["saved_size"] = checks.saved_size(folder, self.size)
            except checks.CheckFailed as e:
                self.checks["saved_size"] = e.check
                self.context.notes["saved_size"] = str(e)
        self.size = {**self.size, "artifact_bytes": folder_bytes(folder),
                     "saved_tensor_bytes": self.checks["saved_size"]["saved_bytes"]}

    def _save_or_explain(self, model, folder: Path) -> str | None:
        """Save and prove; on failure the evaluation stands, the folder goes, and the reason is returned."""
        import shutil

        try:
            self.save_checked(model, folder)
            return None
        except Exception as e:
            shutil.rmtree(folder, ignore_errors=True)
            return error_line(e)
