"""The classes plugins subclass and the objects the runner hands them.

Every plugin class has a ``name`` (what a recipe writes), a pydantic ``Params`` model
(its typed parameters; a recipe list where a field holds a scalar is a sweep axis), and
a docstring whose first line is shown by ``qcompare plugins``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict, Field

from qcompare.results.record import Items
from qcompare.results.store import CellFiles


class Params(BaseModel):
    """Base for plugin parameter schemas: unknown fields are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def RuntimeField(default, **kwargs):  # noqa: N802 - reads like pydantic's Field
    """A parameter that changes how a cell runs but not its result (checkpoint interval, a
    cache switch): a recipe may set it, and cell ids leave it out, so changing it re-runs nothing."""
    return Field(default, json_schema_extra={"runtime": True}, **kwargs)


def runtime_keys(params_cls: type[BaseModel]) -> tuple[str, ...]:
    return tuple(k for k, f in params_cls.model_fields.items() if (f.json_schema_extra or {}).get("runtime"))


def AddedField(default, **kwargs):  # noqa: N802 - reads like pydantic's Field
    """A parameter added to a plugin after cells were stored: it changes results, but cell ids leave
    it out while it holds ``default`` (what every earlier cell ran with), so adding it re-runs nothing."""
    return Field(default, json_schema_extra={"added": True}, **kwargs)


def added_defaults(params_cls: type[BaseModel]) -> dict[str, Any]:
    """{name: default} of the parameters declared with ``AddedField``, in JSON form."""
    return {k: f.default for k, f in params_cls.model_fields.items() if (f.json_schema_extra or {}).get("added")}


class Plugin:
    """Common ground of every plugin class."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # Whether the plugin's result can depend on the seed. A cell none of whose plugins
    # is seeded runs once, not once per seed.
    seeded: ClassVar[bool] = False

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class CellProgress:
    """Steps inside one cell; the runner shows them as a progress bar, and the phase it is in."""

    def __init__(self, start: Callable[[str, int | None], Any] | None = None,
                 phase: Callable[[str], None] | None = None) -> None:
        self._start, self._phase = start, phase

    def phase(self, name: str) -> None:
        """The cell has entered phase ``name`` (load, prepare, distill, convert, evaluate, save, check)."""
        if self._phase is not None:
            self._phase(name)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; the bar disappears when the block ends."""
        if self._start is None:
            yield lambda n=1: None
            return
        advance, done = self._start(description, total)
        try:
            yield advance
        finally:
            done()


@dataclass(frozen=True)
class ModelFacts:
    """A model's sizes, read without loading it (``qcompare.engine.estimate.model_facts``)."""

    parameters: int
    vocab_size: int | None = None
    hidden_size: int | None = None
    tied_embeddings: bool = False

    @property
    def head_parameters(self) -> int:
        return (self.vocab_size or 0) * (self.hidden_size or 0)

    @property
    def body_parameters(self) -> int:
        """Parameters that compute per token besides the embedding lookup and the output head."""
        return max(self.parameters - self.head_parameters * (1 if self.tied_embeddings else 2), 0)


@dataclass(frozen=True)
class CellContext:
    """What the runner knows about the cell being run, handed to every plugin call: the one place a
    plugin method finds the cell's inputs (teacher, tokenizer, data), never also as arguments.

    Frozen: a phase never changes it. ``teacher`` is the float teacher as a fresh view per phase
    (its own module objects over the cached teacher's memory): what a trainer rebinds on it (a
    wrapped forward, ``.to()``, train mode) ends with the phase; what a plugin writes into its
    weights fails the cell (``qcompare.sdk.checks.teacher_unchanged``)."""

    cell_dir: Path
    seed: int | None
    device: str
    tokenizer: Any
    teacher: Any = None
    data: Any = None  # datasets.Dataset with a ``messages`` column, or None
    task_folders: list[Path] = field(default_factory=list)
    progress: CellProgress = field(default_factory=CellProgress)
    report_to: list[str] = field(default_factory=list)
    run_name: str = ""
    # The run's folder for what its cells share across processes (a plugin's cache keeps a
    # subfolder of its own there); None outside a run (e.g. a model rebuilt by export).
    shared_dir: Path | None = None
    # What a plugin wants the cell's record to say about how it ran (e.g. AWQ smoothing it
    # skipped): ``context.notes["awq"] = {...}``. Stored in result.json; the report shows a string note as
    # it is, and a dict note by its "summary" line (an empty summary: nothing to show).
    notes: dict = field(default_factory=dict)
    # Checks a plugin runs on its own work, stored with the runner's in result.json's ``checks`` (kept when one
    # fails): ``context.checks["transform"] = checks.FunctionWatch(...).verdict(...)`` for a pre-rounding transform.
    checks: dict = field(default_factory=dict)
    # The cells of the run (this one included) that train on the same batches as this one: same
    # model, data, seed and ``Distiller.batch_key``; 1 when none shares them (what a cache of
    # per-batch work can hope to be reused by)
    peers: int = 1

    @property
    def checkpoint_dir(self) -> Path:
        """Where a trainer keeps checkpoints so an interrupted cell can resume."""
        return CellFiles(self.cell_dir).checkpoints

    @property
    def tensorboard_dir(self) -> Path:
        """Where TensorBoard events of the cell go (``report_to = ["tensorboard"]``)."""
        return CellFiles(self.cell_dir).tensorboard


class Quantizer(Plugin):
    """Base class of quantizers."""

    # True when ``prepare`` and ``convert`` never write into the float weights they are
    # given (they swap modules, quantize on the fly, build new tensors). The runner may then
    # hand ``prepare`` a student whose weights share memory with the teacher's, when the
    # distiller keeps the base weights too (``Distiller.keeps_base_weights``). GPTQ/AWQ
    # rewrite weights in place: False.
    shares_teacher_weights: ClassVar[bool] = False
    # True when the quantizer puts on a grid layers of kinds ``qcompare.sdk.targets`` does not find (an
    # ``nn.Conv1d``, a grouped-GEMM experts module): validate then counts every weight its ``skip`` leaves
    # as within reach, instead of refusing a body mostly out of the built-in kinds' reach
    # (``checks.coverage_in_reach``); the check after convert measures what it did.
    reaches_other_kinds: ClassVar[bool] = False

    def prepare(self, model, params, context: CellContext):
        """Return a trainable student: ``model`` (already a copy of the teacher) with its
        Linear layers fake-quantized, gradients passing straight through."""
        raise NotImplementedError

    def convert(self, student, params, context: CellContext):
        """Return the real low-bit model made from a (possibly trained) student."""
        raise NotImplementedError

    def save(self, model, params, folder: Path, context: CellContext) -> None:
        """Write the converted ``model`` as a Hugging Face folder that ``from_pretrained`` loads.

        The runner writes the tokenizer and the model card itself. Override when plain
        ``save_pretrained`` cannot describe the format (e.g. set ``config.quantization_config``
        so transformers knows how to load the low-bit weights back).

        A student trained with LoRA keeps float adapters beside its quantized layers; this
        method then receives the base with the adapters unwrapped, and the runner writes the
        adapter beside it as a PEFT adapter (``qcompare.sdk.saving.save_converted``).

        A format transformers does not know is saved as itself: override ``load`` too."""
        model.save_pretrained(folder)

    def load(self, folder: Path, params):
        """Load a folder this quantizer's ``save`` wrote, as the converted model it saved (on the CPU).

        Override it, with ``save``, to ship a format of your own: the runner then records in the folder
        (``qcompare_format.json``) which quantizer, package and entry point saved it, and every load —
        ``qcompare.load_pretrained(folder)``, the reload check, ``qcompare export``, the model card's
        code — goes through your plugin, in a fresh process, with no remote code. A LoRA cell's
        adapter is put back on top of what this returns. Not overridden (the default): the folder is
        one transformers loads, and they load it with ``AutoModelForCausalLM.from_pretrained``."""
        raise NotImplementedError

    @classmethod
    def saves_own_format(cls) -> bool:
        """Whether this quantizer loads what it saves itself (it overrides ``load``)."""
        return cls.load is not Quantizer.load

    def check_model(self, model, params) -> None:
        """Raise ``QcompareError`` (one line) if this quantizer cannot take ``model`` with ``params``.

        ``qcompare validate`` calls it on the model built on the meta device from its
        ``config.json``: every module and shape, no weights. Check what you can from structure
        alone (a layout you do not quantize, a group size that does not divide a layer); the
        default accepts every model."""

    def kept_float(self, params) -> list[str]:
        """Linear-like weights of the body this quantizer leaves in float by design, as ``skip`` patterns
        (a glob, a name suffix or ``re:<regex>``). The runner's coverage check requires every other one
        the recipe's ``skip`` does not name to end on a grid, and names those that did not. Default: none."""
        return []

    def fake_quant_tolerance(self, params) -> float | None:
        """How far the converted model may compute from the trained student, as the largest
        |Δ logit| on the runner's probe batch relative to the largest logit (at least 1).

        ``None`` (the default) takes the tolerance of the dtype the model computes in: a few
        units in the last place (1e-5 in float32, 2e-2 in bfloat16). Return 0.0 when convert
        reproduces the fake quantizer bit for bit, as the built-in quantizers do: then the
        runner holds the plugin to it. A looser value must be documented: a cell whose
        converted model drifts beyond it fails (``qcompare.sdk.checks.fake_vs_converted``)."""
        return None

    def input_groups(self, params) -> tuple[int, int] | None:
        """``(levels, group)``: the most distinct values ``group`` consecutive input features of one row of a
        weight may hold on this quantizer's grid (``group`` 0: a whole row), e.g. ``(16, 32)`` for int4 in
        groups of 32. The runner checks every rounded weight of the trained student against it
        (``checks.groups_along_inputs``): groups that run along another axis — a fused experts weight
        read in its storage order, say — hold values of several scales, and the cell fails. ``None`` (the
        default): not checked."""
        return None

    def bits_per_weight(self, params) -> float:
        """The format's nominal bits per quantized weight (shown as "nominal"): the code plus its
        scales and zero points as the format defines them. The runner measures the true width
        from the converted model (``qcompare.sdk.footprint``) and reports both."""
        raise NotImplementedError

    def code_bits(self, params) -> float | None:
        """The width of one code as the format ships it, when the converted model holds codes
        unpacked (one int8 per int4 code, say): true sizes then count codes at this width.
        ``None`` (the default): codes count as the converted model stores them."""
        return None



@dataclass
class DistillResult:
    """What a distiller hands back: the trained student, its log and what it cost."""

    student: Any
    log: list[dict] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)


class Distiller(Plugin):
    """Base class of distillers (recovery methods)."""

    seeded = True

    def keeps_base_weights(self, params) -> bool:
        """True when ``distill`` never updates the student's base weights (LoRA: only the
        adapters train), so they may share the teacher's memory (see
        ``Quantizer.shares_teacher_weights``)."""
        return False

    def batch_key(self, params) -> tuple | None:
        """What, beyond the model, the data and the seed, decides the batches a cell trains on (batch
        size, sequence length, ...): cells with equal keys see the same batches (the runner counts
        them into ``CellContext.peers``). ``None`` (the default): batches are never shared."""
        return None

    def plan_note(self, params, model: "ModelFacts", peers: int) -> str | None:
        """One line ``qcompare plan`` shows about how cells of this distiller will run on ``model``
        with ``peers`` cells sharing their batches (a cache it will or will not use, and why)."""
        return None

    def planned_tokens(self, params) -> dict[str, float] | None:
        """What a cell will put through the models, known from ``params`` before it runs (upper
        bounds: sequences × their maximum length), for ``qcompare plan``'s price: ``student_tokens``
        (trained: forward and backward), ``teacher_tokens`` (teacher forwards), ``student_rollout_tokens``
        and ``teacher_rollout_tokens`` (prompt and completion through ``generate``) and
        ``generated_tokens``. ``None`` (the default): this distiller gives no estimate."""
        return None

    def distill(self, student, params, context: CellContext) -> DistillResult:
        """Train ``student`` toward ``context.teacher`` (or ``context.data``, tokenized with
        ``context.tokenizer``) and return a DistillResult.

        ``log`` holds one dict per logged step (``step``, ``loss`` and its parts); the
        runner writes it to the cell's ``train_log.jsonl``.
        """
        raise NotImplementedError


@dataclass
class EvalResult:
    """Metrics of one evaluator on one model.

    ``metrics`` and ``stderr`` map ``task/metric`` to a number; ``items`` maps a task to its
    ``Items`` (a plain list of per-item scores is taken as one unnamed metric in item order). ``groups`` maps a group
    task (an aggregate such as lm-eval's ``mmlu``) to its subtasks, so reports average the subtasks
    and do not count the group twice; ``group_weighting`` says how the group aggregates them
    (``"equal"``: the mean of its subtasks; ``"size"``: weighted by their numbers of items).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    items: dict[str, "Items | list[float]"] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    group_weighting: dict[str, str] = field(default_factory=dict)


class Evaluator(Plugin):
    """Base class of evaluators."""

    # True where evaluate() reads the registered task folders (``context.task_folders``): their
    # files then count in each cell's identity, so a changed task file makes its cells stale
    reads_task_folders: bool = False

    def evaluate(self, model, params, context: CellContext) -> EvalResult:
        """Score ``model`` (its tokenizer: ``context.tokenizer``) and return an EvalResult.
        ``context.teacher`` is the float model."""
        raise NotImplementedError

    def check(self, params, task_folders: list[Path]) -> None:
        """Raise ``QcompareError`` (one line) for what would fail every cell after it trained: a task
        that does not exist, a file that is not there. ``qcompare validate`` (and ``run``, before any
        cell) calls it once per evaluator table; keep it quick and light (no model, no torch).
        ``task_folders`` are the folders of task files plugins registered. The default accepts all."""


class Executor(Plugin):
    """Base class of executors: they decide where and in what order cells run."""

    def run(self, cells: list, job, params, on_done: Callable[[Any, Any], None]) -> None:
        """Run ``job(cell)`` for every cell and call ``on_done(cell, record)`` as each ends.

        ``job`` (a ``qcompare.engine.runner.CellJob``) runs one cell in the calling process, stores its
        result and returns the record; it never raises for a failing cell. It pickles small (the
        recipe and the run folder), so an executor may send it to other processes or machines
        that share the run folder; each process builds its own runner on first use and keeps its
        teacher and data across the cells it runs. A cell lost with its process (killed, out of
        memory) is stored with ``job.fail(cell, reason)``; ``job.status(cell)`` tells whether it
        had started. ``job.device`` is the device the run resolved ("cpu", "cuda") and
        ``job.processes`` the data-parallel processes of one cell (1 unless under torchrun).
        """
        raise NotImplementedError
