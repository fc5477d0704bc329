"""Run a recipe's cells: quantize, distill, convert, evaluate, store — skipping finished cells.

The runner never names a plugin; it asks the registry. A cell that raises is stored as
failed with its traceback and the sweep goes on.
"""

from __future__ import annotations

import copy
import gc
import os
import resource
import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qcompare.api import CellContext, CellProgress, EvalResult, state_dict_bytes
from qcompare.cells import Cell, expand
from qcompare.data import load_model, load_training_data
from qcompare.errors import QcompareError
from qcompare.plugins import get_plugin_manager, get_registry
from qcompare.provenance import provenance
from qcompare.recipe import Recipe
from qcompare.store import RESULT, RunStore, write_json, write_jsonl

MODEL = "model"  # a cell's saved model folder (recipe option save_models)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun and accelerate launch set them; (0, 0, 1) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise QcompareError("device = 'cuda' but no CUDA device is visible; use device = 'cpu' or 'auto'")
    _, local_rank, world = launcher_ranks()
    if wanted == "cuda" and world > 1:
        # before anything is loaded: each process's teacher goes to its own GPU, not all to GPU 0
        if local_rank >= torch.cuda.device_count():
            raise QcompareError(f"process LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                                "devices are visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    return wanted


def default_output(recipe: Recipe) -> Path:
    return recipe.output or Path("runs") / recipe.name


def error_line(e: Exception) -> str:
    """How a failure reads in a result: the user's error as it is, anything else with its type."""
    return str(e) if isinstance(e, QcompareError) else f"{type(e).__name__}: {e}"


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (kB on Linux)


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


@dataclass
class Converted:
    """A cell's converted model and what made it."""

    model: Any
    quantizer: Any
    params: Any
    cost: dict
    log: list


@dataclass
class Runner:
    recipe: Recipe
    store: RunStore
    progress: CellProgress = field(default_factory=CellProgress)
    _models: dict = field(default_factory=dict)
    _data: Any = None
    _data_loaded: bool = False

    def __post_init__(self):
        self.registry = get_registry()
        self.hooks = get_plugin_manager().hook
        self.device = pick_device(self.recipe.device)
        # Under a distributed launcher every process runs every cell (the trainers keep them in
        # step); only the first writes the run folder and reports to trackers.
        rank, _, self.processes = launcher_ranks()
        self.writes = rank == 0

    def _json(self, path: Path, obj) -> None:
        if self.writes:
            write_json(path, obj)

    # --- planning -------------------------------------------------------------------

    def cells(self) -> list[Cell]:
        return expand(self.recipe)

    def plan(self) -> list[tuple[Cell, str]]:
        """Each cell with its stored status: done, failed, running (interrupted) or pending."""
        out = []
        for cell in self.cells():
            r = self.store.result(cell.id)
            out.append((cell, r["status"] if r else "pending"))
        return out

    def __getstate__(self):
        # Executors that ship the runner to other processes (Ray) rebuild it there.
        return {"recipe": self.recipe, "store": RunStore(self.store.root.resolve())}

    def __setstate__(self, state):
        self.__init__(state["recipe"], state["store"])

    # --- shared inputs, loaded once per process --------------------------------------

    def teacher(self, name: str):
        if name not in self._models:
            self._models.clear()  # one model in memory at a time
            self._models[name] = load_model(name, self.registry, self.device)
        return self._models[name]

    def data(self):
        if not self._data_loaded:
            self._data = load_training_data(self.recipe.data, self.registry)
            self._data_loaded = True
        return self._data

    # --- one cell ---------------------------------------------------------------------

    def run_cell(self, cell: Cell) -> dict:
        cell_dir = self.store.cell_dir(cell.id)
        cell_dir.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"id": cell.id, "label": cell.label(), "settings": cell.settings(),
                                  "status": "running", "started_at": now(),
                                  # what produced the cell: the run folder's recipe.toml is the latest run's
                                  "recipe": {"text": self.recipe.text, "overrides": self.recipe.overrides}}
        if not cell.is_teacher:
            record["data_source"] = self.recipe.data.model_dump()  # where the data was read from
        self._json(cell_dir / "settings.json", cell.settings())
        self._json(cell_dir / RESULT, record)
        if self.writes:
            self.hooks.cell_started(cell=cell, cell_dir=cell_dir)
        try:
            record.update(self._execute(cell, cell_dir))
            record["status"] = "done"
        except Exception as e:  # the sweep goes on; the traceback is kept with the cell
            record["status"] = "failed"
            record["error"] = error_line(e)
            if self.writes:
                (cell_dir / "traceback.txt").write_text(traceback.format_exc())
        record["finished_at"] = now()
        record["provenance"] = {**provenance(), "processes": self.processes}
        self._json(cell_dir / RESULT, record)
        if self.writes:
            self.hooks.cell_finished(cell=cell, cell_dir=cell_dir, record=record,
                                 report_to=list(self.recipe.report_to), run_name=self.run_name(cell))
        return record

    def store_failure(self, cell: Cell, error: str) -> dict:
        """Record a cell that died outside run_cell (e.g. its worker process was killed)."""
        record = {"id": cell.id, "label": cell.label(), "settings": cell.settings(), "status": "failed",
                  "error": error, "finished_at": now()}
        self._json(self.store.cell_dir(cell.id) / RESULT, record)
        return record

    def context(self, cell: Cell, cell_dir: Path, trackers: bool = True) -> CellContext:
        """What every plugin call of this cell receives."""
        teacher, tokenizer = self.teacher(cell.model)
        return CellContext(cell_dir=cell_dir, seed=cell.seed, device=self.device, tokenizer=tokenizer,
                           teacher=teacher, task_folders=list(self.registry.task_folders),
                           progress=self.progress, report_to=list(self.recipe.report_to) if trackers else [],
                           run_name=self.run_name(cell))

    def run_name(self, cell: Cell) -> str:
        """The cell's name in experiment trackers: the recipe and the cell's settings."""
        return f"{self.recipe.name}/{cell.label()}"

    def converted_model(self, cell: Cell, ctx: CellContext) -> Converted:
        """The pipeline that makes a cell's converted model: prepare → distill → convert.

        ``qcompare run`` and ``qcompare export`` (rebuilding a model that was not saved) both
        call this, so an exported model is the one that was evaluated."""
        from transformers import set_seed

        qcls = self.registry.get("quantizer", cell.quantizer.name)
        dcls = self.registry.get("distiller", cell.distiller.name)
        quantizer, distiller = qcls(), dcls()
        qparams = qcls.Params.model_validate(cell.quantizer.params)
        dparams = dcls.Params.model_validate(cell.distiller.params)
        ctx.data = self.data()
        teacher = ctx.teacher
        set_seed(cell.seed if cell.seed is not None else 0)  # after loading: the same RNG state on either path
        cost: dict[str, Any] = {}
        t0 = time.perf_counter()
        student, cost["student_weights"] = student_copy(teacher, quantizer, distiller, dparams)
        student = quantizer.prepare(student, qparams, ctx)
        cost["prepare_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The distiller trains against a view of the cached teacher (same memory, its own module
        # objects): whatever a trainer rebinds on it (accelerate's autocast forward under bf16,
        # .to(), train mode) ends with this cell instead of leaking into the next ones.
        ctx.teacher = weight_sharing_copy(teacher)
        try:
            result = distiller.distill(ctx.teacher, student, ctx.tokenizer, ctx.data, dparams, ctx)
        finally:
            ctx.teacher = teacher
        cost["distill_seconds"] = time.perf_counter() - t0
        cost.update(result.cost)
        t0 = time.perf_counter()
        model = quantizer.convert(result.student, qparams, ctx)
        cost["convert_seconds"] = time.perf_counter() - t0
        return Converted(model, quantizer, qparams, cost, result.log)

    def save_model(self, converted: Converted, ctx: CellContext, folder: Path) -> None:
        """The converted model as a Hugging Face folder, with the tokenizer (and a LoRA adapter)."""
        from qcompare.export import save_converted

        folder.mkdir(parents=True, exist_ok=True)
        save_converted(converted.quantizer, converted.model, converted.params, folder, ctx)
        ctx.tokenizer.save_pretrained(folder)

    def _execute(self, cell: Cell, cell_dir: Path) -> dict:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ctx = self.context(cell, cell_dir)
        teacher, tokenizer = ctx.teacher, ctx.tokenizer
        cost: dict[str, Any] = {}
        out: dict[str, Any] = {}
        clock = time.perf_counter()
        converted = None
        if cell.is_teacher:
            from transformers import set_seed

            set_seed(0)
            model = teacher
            out["size"] = {"bits_per_weight": torch.finfo(next(teacher.parameters()).dtype).bits,
                           "storage_bytes": state_dict_bytes(teacher)}
        else:
            converted = self.converted_model(cell, ctx)
            model = converted.model
            cost.update(converted.cost)
            if converted.log and self.writes:
                write_jsonl(cell_dir / "train_log.jsonl", converted.log)
            out["size"] = {"bits_per_weight": converted.quantizer.bits_per_weight(converted.params),
                           "storage_bytes": converted.quantizer.storage_bytes(model)}
        t0 = time.perf_counter()
        merged = self._evaluate(model, tokenizer, ctx, cell_dir)
        cost["evaluate_seconds"] = time.perf_counter() - t0
        if converted is not None and self.recipe.save_models and self.writes:
            t0 = time.perf_counter()
            try:
                self.save_model(converted, ctx, cell_dir / MODEL)
                cost["save_seconds"] = time.perf_counter() - t0
            except Exception as e:  # the evaluation stands; only the saved copy is missing
                shutil.rmtree(cell_dir / MODEL, ignore_errors=True)
                out["save_error"] = error_line(e)
        cost["total_seconds"] = time.perf_counter() - clock
        cost["peak_memory_bytes"] = peak_memory_bytes(self.device)
        # CUDA's peak is reset per cell; CPU RSS only ever grows, so it is the process's peak so far
        cost["peak_memory_scope"] = "cell" if self.device == "cuda" else "process"
        cost["device"] = self.device
        self._json(cell_dir / "cost.json", cost)
        out.update(metrics=merged.metrics, stderr=merged.stderr, groups=merged.groups, cost=cost)
        return out

    def _evaluate(self, model, tokenizer, ctx: CellContext, cell_dir: Path) -> EvalResult:
        merged = EvalResult()
        for choice in self.recipe.evaluators:
            ecls = self.registry.get("evaluator", choice.name)
            res = ecls().evaluate(model, tokenizer, ecls.Params.model_validate(choice.params), ctx)
            for key in res.metrics:
                if key in merged.metrics:
                    raise QcompareError(f"two evaluators report the metric {key!r}; give them different tasks")
            merged.metrics.update(res.metrics)
            merged.stderr.update(res.stderr)
            merged.items.update(res.items)
            merged.groups.update(res.groups)
        if merged.items:
            self._json(cell_dir / "items.json", merged.items)
        return merged

    # --- the sweep --------------------------------------------------------------------

    def run(self, on_done=None) -> list[dict]:
        """Run every cell not yet done; return the records of the cells run now."""
        if self.writes:
            self.store.init(self.recipe.text)
        todo = [c for c, status in self.plan() if status != "done"]
        ex_cls = self.registry.get("executor", self.recipe.executor.name)
        params = ex_cls.Params.model_validate(self.recipe.executor.params)
        records: list[dict] = []

        def done(cell, record):
            records.append(record)
            if on_done:
                on_done(cell, record)

        # Every trainer ends with a full gc.collect (accelerate's free_memory), which walks each
        # object the libraries made at import: 0.25 s a cell here. Frozen, they are skipped;
        # what a cell makes is still collected, and the freeze ends with the run.
        frozen_before = gc.get_freeze_count()  # a host program's own freeze is left as it was
        gc.collect()
        gc.freeze()
        try:
            ex_cls().run(todo, self.run_cell, params, done)
        finally:
            if not frozen_before:
                gc.unfreeze()
        return records
