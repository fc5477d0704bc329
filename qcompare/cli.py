"""The ``qcompare`` command line: run, plan, validate, plugins, report, export."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from qcompare.errors import QcompareError

# torchao announces on import the CUDA kernels a CPU wheel lacks, and torch warns about its
# pytree registrations: noise on every command, with nothing for the user to do.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
    logging.getLogger(_name).setLevel(logging.ERROR)

app = typer.Typer(
    help="Compare LLM quantizers and the distillation methods that recover their accuracy, from one TOML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped or captured output gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe TOML file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe field, e.g. --set seeds=[0,1] --set quantizers[0].bits=4.",
                 metavar="FIELD=VALUE"),
]


def _version(value: bool):
    if value:
        from qcompare.version import __version__

        console.print(f"qcompare {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
):
    """Compare LLM quantizers and the distillation methods that recover their accuracy, from one TOML recipe."""


@contextmanager
def user_errors():
    """Bad input becomes one line per mistake on stderr and exit code 2, never a traceback."""
    from qcompare.sdk.checks import CheckFailed

    try:
        yield
    except QcompareError as e:
        for line in str(e).splitlines():  # escaped: a message may name "[[quantizers]]"
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        # a result that failed its check is no input mistake: exit 1, like a failed cell
        raise typer.Exit(1 if isinstance(e, CheckFailed) else 2) from None


def _load(recipe: Path, overrides, output: Path | None = None, executor: str | None = None, structure: bool = False):
    """The recipe and its run store; with ``structure``, also each model's layout checked against
    each quantizer from its config (qcompare.engine.structure): every problem is a line of one error."""
    from qcompare.errors import RecipeError
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import default_output
    from qcompare.results.store import RunStore

    overrides = list(overrides or [])
    if executor:
        overrides.append(f"executor.name={executor!r}".replace("'", '"'))
    r = load_recipe(recipe, overrides)
    if structure:
        from qcompare.sdk.registry import get_registry
        from qcompare.engine.structure import problems

        found, notes = problems(r, get_registry())
        for note in notes:
            err_console.print(f"[dim]note: {note}[/]", highlight=False)
        if found:
            raise RecipeError(found)
    return r, RunStore(output or default_output(r))


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None):
    """Check a recipe against every plugin's schema; list every mistake at once."""
    with user_errors():
        r, _ = _load(recipe, set_, structure=True)
    from qcompare.engine.cells import expand

    console.print(f"[green]ok[/] {recipe}: {len(expand(r))} cells")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _memory_lines(cells, estimates, device: str, gpu_memory: float | None) -> list[str]:
    """The expected peak per distinct memory shape of the cells to run, its biggest parts, and for
    one that will not fit the device, the recipe changes that would each make it fit."""
    from qcompare.engine.memory import device_capacity, fixes, gib, summary

    groups: dict[str, list] = {}
    for cell in cells:
        e = estimates.get(cell.id)
        if e is not None and e.memory is not None:
            groups.setdefault(summary(e.memory), []).append((cell, e))
    if not groups:
        return []
    capacity, label = device_capacity(device, gpu_memory)
    lines = [f"peak memory per cell ({label}; an estimate, see docs/scale.md):"]
    for text, members in groups.items():
        ids = ", ".join(c.id for c, _ in members[:3]) + (f" (+{len(members) - 3})" if len(members) > 3 else "")
        lines.append(f"  {ids}: {text}")
        e = members[0][1]
        if e.memory.peak > capacity:
            tries = fixes(**e.memory_inputs, capacity=capacity, device=device)
            lines.append(f"    [red]will not fit[/]: needs ~{gib(e.memory.peak)} GiB of {gib(capacity)}; "
                         + ("try: " + "; ".join(tries) if tries else "no single change of the recipe makes it fit"))
    return lines


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder (default runs/<recipe name>).")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="Price the cells on this device (cpu or cuda; default: the recipe's, for auto whether a GPU is here).")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", min=1, metavar="GiB",
        help="GPU memory a cell may use (default: the GPU here, else an assumed 80 GiB).")] = None,
):
    """Show the cells a recipe expands to, which are already done, and what the rest will cost
    (FLOPs, wall time, GPU-hours, peak memory), before running anything."""
    from rich.table import Table

    from qcompare.engine.estimate import estimate_cells, guess_device, plan_notes
    from qcompare.engine.memory import gib
    from qcompare.sdk.registry import get_registry
    from qcompare.engine.runner import plan as plan_cells

    with user_errors():
        if device not in (None, "cpu", "cuda"):
            raise QcompareError(f"unknown --device {device!r}; allowed: cpu, cuda")
        r, store = _load(recipe, set_, output)
        rows = plan_cells(r, store)
        device = device or guess_device(r)
        todo = [cell for cell, status in rows if status not in ("done",)]
        estimates = estimate_cells(r, store, todo, get_registry(), device)
        notes = plan_notes([cell for cell, _ in rows], get_registry())
    table = Table(title=f"{r.name}: {len(rows)} cells → {store.root}")
    for col in ("cell", "model", "quantizer", "distiller", "seed", "status", "TFLOP", "time", "GiB"):
        table.add_column(col, justify="right" if col in ("TFLOP", "time", "GiB") else "left")
    style = {"done": "green", "stale": "yellow", "failed": "red", "damaged": "red", "running": "yellow",
             "interrupted": "yellow", "pending": "dim"}
    for cell, status in rows:
        e = estimates.get(cell.id)
        table.add_row(cell.id, cell.model, cell.quantizer.label() if cell.quantizer else "—",
                      cell.distiller.label() if cell.distiller else "—",
                      "—" if cell.seed is None else str(cell.seed), f"[{style[status]}]{status}[/]",
                      "—" if e is None else ("?" if e.flops is None else f"{e.flops / 1e12:.3g}"),
                      "—" if e is None else _duration(e.seconds),
                      "—" if e is None or e.memory is None else f"~{gib(e.memory.peak)}")
    console.print(table)
    for line in _memory_lines(todo, estimates, device, gpu_memory):
        console.print(line, highlight=False)
    known = [e for e in estimates.values() if e.seconds is not None]
    bases = sorted({e.basis for e in estimates.values()})
    if known:
        flops, seconds = sum(e.flops for e in known), sum(e.seconds for e in known)
        gpu = f" = {seconds / 3600:.2f} GPU-h" if device == "cuda" else ""
        console.print(f"to run: {len(todo)} cells, {flops / 1e12:.3g} TFLOP, about {_duration(seconds)} on {device}{gpu}, "
                      "one cell at a time" + (f" ({len(todo) - len(known)} cells not priced)" if len(known) < len(todo)
                                              else ""), highlight=False)
        console.print("[dim]FLOPs: 6·N per trained token, 2·N per teacher and rollout token (every sequence at its "
                      "maximum length unless this run folder measured less); time: " + "; ".join(bases) +
                      ". `qcompare report` sets these estimates against what the cells took.[/]", highlight=False)
    elif todo:
        console.print(f"to run: {len(todo)} cells, not priced: {'; '.join(bases)}", highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    stale = sum(status == "stale" for _, status in rows)
    if stale:
        console.print(f"[yellow]{stale} cells are stale[/]: done by other versions of their plugins (or from other "
                      "model or data files) than the ones installed now; `qcompare run` runs them again (--keep-stale "
                      "keeps them, reported as rows of their own)", highlight=False)
    for line in _status_lines(rows, store):
        console.print(line, highlight=False)


def _status_lines(rows, store) -> list[str]:
    """What plan says of damaged and interrupted cells: what is wrong, and what a run will do."""
    from qcompare.engine.runner import resume_step

    lines = []
    for cell, status in rows:
        if status == "damaged":
            state = store.cell(cell.id).inspect()
            lines.append(f"[red]damaged[/] {cell.id} ({state.label}): {'; '.join(state.problems)} — `qcompare run` "
                         "runs it again and keeps the damaged files aside")
        elif status == "interrupted":
            step = resume_step(store.cell(cell.id))
            lines.append(f"[yellow]interrupted[/] {cell.id} ({cell.label()}): its process is gone; `qcompare run` "
                         + (f"resumes it from its checkpoint at step {step}" if step is not None else "runs it again"))
    return lines


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder (default runs/<recipe name>).")] = None,
    executor: Annotated[Optional[str], typer.Option(help="Executor plugin (default: the recipe's, else local).")] = None,
    keep_stale: Annotated[bool, typer.Option(
        "--keep-stale", help="Keep cells done by other plugin versions (or model or data files) instead of running them again "
                             "(the report shows them as rows of their own).")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show what the libraries print (progress bars, warnings, logs) here; by default "
                                "it goes to each cell's output.log.")] = False,
):
    """Run every cell of a recipe not yet done, then print the comparison table.

    In a terminal a live display shows the cells with an ETA, the running cell's phase and steps,
    and a line per finished cell; written to a file, the run prints one line as each cell starts
    and one as it ends."""
    from qcompare.engine.progress import RunDisplay
    from qcompare.engine.capture import own_stream
    from qcompare.reports.tables import print_report
    from qcompare.engine.runner import Runner, launcher_ranks

    first = launcher_ranks()[0] == 0  # under torchrun every process runs the cells; the first one speaks
    # the display keeps a stream of its own: a cell's libraries write into the cell's log
    say = Console(file=own_stream(sys.stderr), width=None if sys.stderr.isatty() else 200)
    with user_errors():
        r, store = _load(recipe, set_, output, executor, structure=True)
        runner = Runner(r, store, cell_logs=not verbose)
        plan = runner.plan()
        kept = ("done", "stale") if keep_stale else ("done",)
        todo = [c for c, s in plan if s not in kept]
        stale = sum(s == "stale" for _, s in plan)
        skipped = len(plan) - len(todo)
        if skipped and first:
            say.print(f"{skipped} cells already done in {store.root}; running {len(todo)}", highlight=False)
        if stale and first:
            say.print(f"{stale} cells were done by other plugin versions or model or data files: "
                      + ("kept as they are (--keep-stale)" if keep_stale else "running them again"), highlight=False)
        in_process = r.executor.name == "local" and r.executor.params.get("workers", 1) == 1
        with RunDisplay(say, len(todo), in_process, quiet=not first) as display:
            runner.progress, runner.on_start = display.cell_progress, display.started
            records = runner.run(on_done=display.finished, keep_stale=keep_stale, announce=not display.live,
                                 say=(lambda line: say.print(line, highlight=False)) if first else (lambda line: None))
    failed = [rec for rec in records if not rec.done]
    unsaved = [rec for rec in records if rec.done and rec.save_error]
    if not first:
        raise typer.Exit(1 if failed else 0)
    print_report(store, console)
    if r.export_best:
        from qcompare.export import export_best

        with user_errors():
            export_best(store.root, r.export_best, say=lambda m: err_console.print(m, highlight=False))
    if unsaved:  # which, and why, the report above lists
        err_console.print(f"[red]{len(unsaved)} cells' models were not saved[/] (save_models = true)", highlight=False)
    if failed:
        retry = sum(bool(rec.rerun_helps) for rec in failed)
        why = (f"{retry} may end otherwise if you run the recipe again (killed, out of memory); " if retry else "") + \
            (f"{len(failed) - retry} fail the same way until the recipe or a plugin changes; " if len(failed) > retry else "")
        err_console.print(f"[red]{len(failed)} of {len(records)} cells failed[/]: {why}tracebacks and output.log in "
                          f"their folders under {store.root}/cells", highlight=False)
    if failed or unsaved:
        raise typer.Exit(1)


def type_text(annotation) -> str:
    """A parameter's type as a recipe author reads it: the allowed values of a Literal, ``X | None``."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@app.command()
def plugins():
    """List every registered plugin with its parameters, allowed values, defaults, and the package
    and entry point it came from (QCOMPARE_PLUGINS=name,name loads only those entry points)."""
    from rich.table import Table

    from qcompare.sdk.registry import KINDS, get_registry

    with user_errors():
        reg = get_registry(clashes_allowed=True)
    for kind in KINDS:
        for name in reg.names(kind):
            entry = reg.plugins[kind][name]
            cls = entry.obj
            table = Table(title=f"{kind} [bold]{name}[/] — {cls.summary()}  (from {entry.source})",
                          title_justify="left")
            for col in ("parameter", "type", "default", "description"):
                table.add_column(col)
            for pname, f in cls.Params.model_fields.items():
                default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
                table.add_row(pname, type_text(f.annotation), default, f.description or "")
            console.print(table)
    for title, table in (("models", reg.models), ("datasets", reg.datasets)):
        for name, entry in sorted(table.items()):
            console.print(f"{title[:-1]} [bold]{name}[/] — {entry.obj[1]}  (from {entry.source})")
    console.print(f"entry points loaded (what QCOMPARE_PLUGINS takes): {', '.join(reg.entry_points) or '(none)'}",
                  highlight=False)
    if reg.clashes:
        for line in reg.clashes:
            err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `qcompare run`.", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table, markdown, latex, csv, json, or html (one self-contained file with the "
                               "tables, figures and a section per cell; see --out). Every format names the damaged, "
                               "unfinished and unsaved cells: markdown after the table, latex as %-comments after it; "
                               "csv and json as rows of their own (kind 'damaged' or 'not finished', an error column) "
                               "and a 'model not saved' column; csv quotes its text, so read_csv(comment='#') is "
                               "safe.")] = "table",
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Where --format html writes (default: report.html in the run folder).")] = None,
    compare: Annotated[Optional[tuple[str, str]], typer.Option(
        "--compare", metavar="A B",
        help="A − B with seeds and items as sources of variance, and a verdict; A and B are cell ids or "
             "settings like lmbda=1 that select one configuration's seeds.")] = None,
    margin: Annotated[Optional[float], typer.Option(
        help="Equivalence margin of --compare (default: the recipe's [report] margin): 'equivalent within ±margin' "
             "when the 90% interval lies inside it.", min=0)] = None,
    pool: Annotated[bool, typer.Option(
        "--pool", help="Let a --compare selector match several configurations and treat them as one.")] = False,
    rows: Annotated[Optional[str], typer.Option(help="Pivot: the setting along the rows (e.g. lmbda).")] = None,
    cols: Annotated[Optional[str], typer.Option(help="Pivot: the setting along the columns (e.g. beta).")] = None,
    fold: Annotated[str, typer.Option(
        help="Pivot cells holding several configurations: 'best' (chosen on the recipe's [report] select_on, "
             "else on --metric) or 'mean'.")] = "best",
    metric: Annotated[str, typer.Option(help="Metric of --compare, the pivot and figures: average or task/metric.")] = "average",
    figures: Annotated[Optional[Path], typer.Option(help="Write PNG figures into this folder.")] = None,
):
    """Print the comparison tables of a run folder; compare two configurations; pivot; export; plot."""
    from qcompare.reports.tables import FORMATS, print_report
    from qcompare.results.store import open_run

    with user_errors():
        if fmt not in (*FORMATS, "html"):
            raise QcompareError(f"unknown --format {fmt!r}; allowed: {', '.join(FORMATS)}, html")
        if (rows is None) != (cols is None):
            raise QcompareError("a pivot needs both --rows and --cols")
        store = open_run(run_dir)
        from qcompare.engine.recipe import report_settings

        settings = report_settings(store.root)
        if compare:
            from qcompare.reports.compare import print_comparison

            print_comparison(store.root, *compare, console, metric, margin if margin is not None else settings.margin,
                             pool)
        elif rows:
            from qcompare.reports.pivots import print_pivot

            print_pivot(store.root, rows, cols, metric, console, fold, settings.select_on)
        elif fmt == "html":
            from qcompare.reports.html import write_html

            path = write_html(store.root, out or store.root / "report.html", metric)
            console.print(f"[green]wrote[/] {path}", highlight=False)
        else:
            print_report(store, console, fmt)
        if figures:
            from qcompare.reports.figures import write_figures

            for path in write_figures(store.root, figures, metric):
                err_console.print(f"wrote {path}")


@app.command()
def paper(
    runs: Annotated[Path, typer.Argument(help="The folder holding the studies' run folders.")] = Path("runs"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Where tables.md, tables.tex and figures/ go.")] = Path("paper"),
    margin: Annotated[Optional[float], typer.Option(help="Equivalence margin of the verdicts.", min=0)] = None,
):
    """Write the founding study's tables (markdown and LaTeX, with verdicts) from the runs of
    recipes/paper/ (paper_<study>) or of their toy twins (toy_paper_<study>)."""
    from qcompare.study.paper import write

    with user_errors():
        md, tex, missing = write(runs, out, margin)
    console.print(f"[green]wrote[/] {md} and {tex}", highlight=False)
    if missing:
        err_console.print(f"not run yet: {', '.join(missing)}", highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `qcompare run`.", show_default=False)],
    cell: Annotated[str, typer.Argument(help="A cell id or a unique prefix of one.", show_default=False)],
    to: Annotated[Path, typer.Option("--to", help="The folder to write (new or empty).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace the folder if it holds files.")] = False,
):
    """Write a cell's converted model as a Hugging Face folder with its tokenizer and a model card."""
    from qcompare.export import export_cell

    with user_errors():
        out = export_cell(run_dir, cell, to, overwrite=force, say=lambda m: err_console.print(m, highlight=False))
    console.print(f"[green]exported[/] {cell} → {out}")

