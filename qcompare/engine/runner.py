"""Run a recipe's cells, skipping finished ones: each cell's phases (qcompare.engine.pipeline), its
record and files (qcompare.results.store), the lifecycle hooks, and the executor that decides where
cells run.

The runner never names a plugin; it asks the registry. A cell that raises is stored as
failed with its traceback and the sweep goes on.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from qcompare.sdk.api import CellContext, CellProgress
from qcompare.engine.cells import Cell, expand
from qcompare.errors import QcompareError, error_line, transient
from qcompare.engine.estimate import batch_peers, estimate_cells
from qcompare.engine.capture import cell_output
from qcompare.engine.pipeline import CellPipeline, InputCache
from qcompare.sdk.registry import get_plugin_manager, get_registry
from qcompare.results.record import CellRecord
from qcompare.engine.recipe import Recipe
from qcompare.results.store import RunStore, file_digests, write_json, write_jsonl
from qcompare.sdk.memo import memo_dict


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


_identities: dict = memo_dict()  # plugin identities by plugin: hashed once per process


def plugin_identities(cell: Cell, registry) -> dict:
    """The identity (package, version, source hash) of every plugin the cell's result depends on,
    and, by content, the local files it reads by name: the model's folder (``model:<name>``),
    every registered dataset or local data file its settings name (``data:<name>``: training,
    calibration and evaluation data) and the registered task folders where an evaluator reads them
    (``tasks:<folder>``). A file rebuilt under the same name makes finished cells stale."""
    from qcompare.engine.inputs import resolve_model
    from qcompare.engine.provenance import files_identity, model_identity, plugin_identity

    out = {}
    model = model_identity(resolve_model(cell.model, registry))
    if model is not None:
        out[f"model:{cell.model}"] = model
    for kind, name in cell.plugins():
        entry = registry.plugins[kind][name]
        key = (kind, name, id(entry.obj))
        if key not in _identities:
            _identities[key] = plugin_identity(entry)
        out[f"{kind}:{name}"] = _identities[key]
    for name, path in data_files(cell, registry):
        out[f"data:{name}"] = files_identity(path, recursive=True)
    if any(getattr(registry.plugins["evaluator"][name].obj, "reads_task_folders", False)
           for kind, name in cell.plugins() if kind == "evaluator"):
        for folder in registry.task_folders:
            out[f"tasks:{folder.parent.name}/{folder.name}"] = files_identity(folder, recursive=True)
    return out


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def data_files(cell: Cell, registry) -> list[tuple[str, Path]]:
    """Every string in the cell's settings that names a registered dataset or an existing local
    data file (by suffix), with its path; hub ids are the hub's business, as for models. A local
    training file is left out: the cell's id holds it by name and content (cells.data_identity)."""
    found: dict[str, Path] = {}

    def visit(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str):
            if value in registry.datasets:
                found[value] = Path(registry.datasets[value].obj[0])
            elif value.endswith(DATA_SUFFIXES) and Path(value).is_file():
                found[value] = Path(value)

    settings = cell.settings()
    data = settings["data"] or {}
    if "train_sha256" not in data:  # a local training file is in the cell's id already (by content)
        visit(data)
    visit([settings["quantizer"], settings["distiller"], settings["evaluators"]])
    return sorted(found.items())


def plan(recipe: Recipe, store: RunStore) -> list[tuple[Cell, str]]:
    """Each cell with its stored status: done, stale (done by other plugin versions than the ones
    installed now, or from other contents of a local model or data file: ``plugin_identities``),
    damaged (its record unreadable or missing, or a file it names gone or changed: ``CellFiles.inspect``),
    failed, running (its process alive), interrupted (its process gone) or pending."""
    registry = get_registry()
    out = []
    for cell in expand(recipe):
        state = store.cell(cell.id).inspect()
        r = state.record
        status = "damaged" if state.damaged else r.status if r else "pending"
        if status == "done" and r.plugins and r.plugins != plugin_identities(cell, registry):
            status = "stale"
        if status == "running" and not still_running(r):
            status = "interrupted"
        out.append((cell, status))
    return out


def still_running(record: CellRecord) -> bool:
    """Whether the process that started a cell still runs: the record of a running cell names its host and
    process id. On another host it cannot be told, and counts as running."""
    import socket

    where = record.provenance or {}
    if where.get("host") != socket.gethostname() or not isinstance(where.get("pid"), int):
        return where.get("host") is not None and where.get("host") != socket.gethostname()
    try:
        os.kill(where["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def resume_step(files) -> int | None:
    """The step an interrupted cell resumes from: its trainer's last checkpoint, if it left one."""
    steps = [int(p.name.rsplit("-", 1)[1]) for p in files.checkpoints.glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit()] if files.checkpoints.is_dir() else []
    return max(steps) if steps else None


@dataclass
class Runner:
    recipe: Recipe
    store: RunStore
    progress: CellProgress = field(default_factory=CellProgress)
    # what libraries print while a cell runs goes to the cell's output.log (qcompare.engine.capture), not here
    cell_logs: bool = False
    on_start: Callable[[Cell], None] | None = None  # told as each cell starts in this process
    estimates: dict = field(default_factory=dict)  # cell id -> its estimated cost, kept in its record

    def __post_init__(self):
        self.registry = get_registry()
        self.hooks = get_plugin_manager().hook
        self.device = pick_device(self.recipe.device)
        self.inputs = InputCache(self.registry, self.device)
        # Under a distributed launcher every process runs every cell (the trainers keep them in
        # step); only the first writes the run folder and reports to trackers.
        rank, _, self.processes = launcher_ranks()
        self.writes = rank == 0
        self.peers = batch_peers(expand(self.recipe), self.registry)  # cells that share training batches

    def _write(self, path: Path, obj) -> None:
        if self.writes:
            write_json(path, obj)

    def plan(self) -> list[tuple[Cell, str]]:
        return plan(self.recipe, self.store)

    def run_name(self, cell: Cell) -> str:
        """The cell's name in experiment trackers: the recipe and the cell's settings."""
        return f"{self.recipe.name}/{cell.label()}"

    # --- one cell ---------------------------------------------------------------------

    def pipeline(self, cell: Cell, cell_dir: Path) -> CellPipeline:
        """The cell's phases with its inputs (loaded now, before any phase) and context."""
        inputs = self.inputs.inputs(cell, self.recipe.data)
        context = CellContext(cell_dir=cell_dir, seed=cell.seed, device=self.device, tokenizer=inputs.tokenizer,
                              teacher=inputs.teacher, data=inputs.data, task_folders=list(self.registry.task_folders),
                              progress=self.progress, report_to=list(self.recipe.report_to),
                              run_name=self.run_name(cell), shared_dir=self.store.shared,
                              peers=self.peers.get(cell.id, 1))
        return CellPipeline(cell, inputs, context, self.registry, self.recipe.evaluators)

    def run_cell(self, cell: Cell) -> CellRecord:
        files = self.store.cell(cell.id)
        files.folder.mkdir(parents=True, exist_ok=True)
        record = CellRecord(id=cell.id, label=cell.label(), settings=cell.settings(), status="running",
                            started_at=now(), plugins=plugin_identities(cell, self.registry),
                            provenance=_running_here(),  # so plan can tell a running cell from an interrupted one
                            # what produced the cell: the run folder's recipe.toml is the latest run's
                            recipe={"text": self.recipe.text, "overrides": self.recipe.overrides},
                            data_source=None if cell.is_teacher else self.recipe.data.model_dump(),
                            estimate=self.estimates.get(cell.id, {}))
        self._write(files.settings, cell.settings())
        self._write(files.result, record.to_json())
        if self.on_start is not None and self.writes:
            self.on_start(cell)
        if self.writes:
            self.hooks.cell_started(cell=cell, cell_dir=files.folder)
        pipeline = None
        try:
            save_to = files.model if self.recipe.save_models and self.writes else None
            with cell_output(files.output_log if self.cell_logs and self.writes else None):
                self.progress.phase("load")
                pipeline = self.pipeline(cell, files.folder)
                out = pipeline.run(save_to=save_to)
            if self.writes:
                if out.log:
                    write_jsonl(files.train_log, out.log)
                if out.items:
                    files.write_items(out.items)
                if out.fingerprint is not None:
                    out.fingerprint.save(files.probe)
                write_json(files.cost, out.cost)
            written = file_digests(files.folder, [files.items, files.probe, files.train_log, files.model]) \
                if self.writes else {}
            record = record.model_copy(update=dict(
                status="done", size=out.size, metrics=out.metrics, stderr=out.stderr, groups=out.groups,
                cost=out.cost, checks=out.checks, notes=out.notes, save_error=out.save_error,
                group_weighting=out.group_weighting, files=written))
        except Exception as e:  # the sweep goes on; the traceback is kept with the cell
            if getattr(e, "name", None) == "teacher":  # checks.teacher_unchanged: the next cell loads it anew
                self.inputs.forget(cell.model)
            record = record.model_copy(update={"status": "failed", "error": error_line(e),
                                               "rerun_helps": transient(e),
                                               "checks": pipeline.checks if pipeline else {},
                                               "notes": pipeline.context.notes if pipeline else {}})
            if self.writes:
                files.traceback.write_text(traceback.format_exc())
        record = record.model_copy(update={"finished_at": now(), "provenance": self._provenance()})
        self._write(files.result, record.to_json())
        if self.writes:
            self.hooks.cell_finished(cell=cell, cell_dir=files.folder, record=record.to_json(),
                                     report_to=list(self.recipe.report_to), run_name=self.run_name(cell))
        return record

    def set_aside_damage(self, cells: list[Cell]) -> list[str]:
        """Move the damaged files of ``cells`` aside (``<file>.damaged``) so they run again from scratch;
        one line for each, saying what was wrong and where it was kept."""
        lines = []
        for cell in cells:
            files = self.store.cell(cell.id)
            state = files.inspect()
            if not state.damaged:
                continue
            # the record itself, or the files it names (a saved model's files: the whole model folder)
            names = ["model" if n.startswith("model/") else n for n in state.damage]
            if state.record is not None:
                names.append(files.result.name)  # its record describes files that are no more
            moved = files.set_aside(names) if self.writes else []
            lines.append(f"cell {cell.id} ({state.label}) is damaged — {'; '.join(state.problems)} — "
                         f"running it again" + (f"; kept aside: {', '.join(moved)}" if moved else ""))
        return lines

    def _provenance(self) -> dict:
        from qcompare.engine.provenance import provenance

        return {**provenance(), "processes": self.processes, "pid": os.getpid()}

    def store_failure(self, cell: Cell, error: str, rerun_helps: bool = True) -> CellRecord:
        """Record a cell that died outside run_cell (its worker process killed, a lost machine):
        by default a failure that running the recipe again may not meet."""
        record = CellRecord(id=cell.id, label=cell.label(), settings=cell.settings(), status="failed",
                            error=error, rerun_helps=rerun_helps, finished_at=now())
        self._write(self.store.cell(cell.id).result, record.to_json())
        return record

    # --- the sweep --------------------------------------------------------------------

    def run(self, on_done=None, keep_stale: bool = False, announce: bool = False,
            say: Callable[[str], None] = lambda line: None) -> list[CellRecord]:
        """Run every cell not yet done (and, unless ``keep_stale``, every cell made by other plugin
        versions); return the records of the cells run now. With ``announce``, cells run by other
        processes (workers) print a line as they start. Damaged cells run again, their damaged files
        kept aside; ``say`` gets a line for each, and for each interrupted cell resumed from a checkpoint."""
        if self.writes:
            self.store.init(self.recipe.text)
        kept = ("done", "stale") if keep_stale else ("done",)
        planned = self.plan()
        todo = [c for c, status in planned if status not in kept]
        for line in self.set_aside_damage([c for c, status in planned if status == "damaged"]):
            say(line)
        for cell, status in planned:
            step = resume_step(self.store.cell(cell.id)) if status == "interrupted" else None
            if step is not None:
                say(f"cell {cell.id} ({cell.label()}) was interrupted; it resumes from its checkpoint at step {step}")
        self.estimates = {cid: e.as_record() for cid, e in
                          estimate_cells(self.recipe, self.store, todo, self.registry, self.device).items()}
        ex_cls = self.registry.get("executor", self.recipe.executor.name)
        params = ex_cls.Params.model_validate(self.recipe.executor.params)
        records: list[CellRecord] = []

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
            ex_cls().run(todo, CellJob(self, announce), params, done)
        finally:
            if not frozen_before:
                gc.unfreeze()
        return records


class CellJob:
    """What an executor runs: ``job(cell)`` runs one cell in this process and returns its record
    (it never raises for a failing cell: the failure is stored).

    A job pickles as the recipe and the run folder, never as loaded models, so an executor may
    send it to other processes; there the first call builds that process's own runner, which
    keeps its teacher and data for the cells that follow. ``device`` and ``processes`` say what
    the driver resolved (a GPU run; a data-parallel launch), ``fail`` stores a cell that died
    outside ``job(cell)`` and ``status`` reads a cell's stored status.
    """

    def __init__(self, runner: Runner, announce: bool = False):
        self.recipe, self.run_dir = runner.recipe, runner.store.root.resolve()
        self.device, self.processes = runner.device, runner.processes
        # how another process runs its cells: libraries' output into cell logs as here, and (when
        # the driver writes to a log, not a live display) a line as each cell starts
        self.cell_logs, self.announce, self.estimates = runner.cell_logs, announce, runner.estimates
        self._runner: Runner | None = runner
        self._owner = os.getpid()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_runner"}

    def __setstate__(self, state):
        self.__dict__.update(state, _runner=None)

    @property
    def runner(self) -> Runner:
        if self._owner != os.getpid():
            # a forked worker inherits the driver's runner, progress display and all: a display
            # whose refresh thread held its lock at the fork deadlocks the worker's first bar
            self._runner, self._owner = None, os.getpid()
        if self._runner is None:
            self._runner = Runner(self.recipe, RunStore(self.run_dir), cell_logs=self.cell_logs,
                                  on_start=_announce if self.announce else None, estimates=self.estimates)
        return self._runner

    def start_process(self) -> None:
        """Build this process's runner now (a worker's set-up) and freeze what imports made,
        as ``Runner.run`` does in one process."""
        _ = self.runner
        gc.collect()
        gc.freeze()

    def __call__(self, cell: Cell) -> CellRecord:
        return self.runner.run_cell(cell)

    def fail(self, cell: Cell, error: str, rerun_helps: bool = True) -> CellRecord:
        return self.runner.store_failure(cell, error, rerun_helps)

    def status(self, cell: Cell) -> str | None:
        stored = RunStore(self.run_dir).result(cell.id)
        return stored.status if stored else None


def _announce(cell: Cell) -> None:
    print(f"start {cell.label()}", file=sys.stderr, flush=True)


def _running_here() -> dict:
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid()}
