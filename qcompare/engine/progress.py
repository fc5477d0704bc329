"""What ``qcompare run`` shows while it runs, fit for where it goes.

In a terminal, one live display: the cells bar with its ETA, the running cell with its phase and
its step bars, and above them a line for each cell that ended, with its headline numbers. In a log
file (CI, ``nohup``) no display: a line as each cell starts and one as it ends, nothing else; what
the libraries print goes to each cell's ``output.log`` (``qcompare.engine.capture``).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from qcompare.sdk.api import CellProgress


def headline(record) -> str:
    """A finished cell in one line: its average accuracy (or its one metric), true bits, time."""
    from qcompare.results.frame import primary_metrics

    parts = []
    keys = [k for k in primary_metrics(record.metrics, record.groups) if record.metrics.get(k) is not None]
    if len(keys) > 1:
        parts.append(f"average {sum(record.metrics[k] for k in keys) / len(keys):.3f}")
    elif keys:
        parts.append(f"{keys[0]} {record.metrics[keys[0]]:.3f}")
    elif record.metrics:
        key = sorted(record.metrics)[0]
        parts.append(f"{key} {record.metrics[key]:.4g}")
    bits = (record.size or {}).get("bits_per_weight")
    if bits:
        parts.append(f"{bits:.2f} bits/weight")
    seconds = (record.cost or {}).get("total_seconds")
    if seconds is not None:
        parts.append(f"{seconds:.0f} s")
    return " · ".join(parts)


def outcome(record) -> str:
    """How a cell ended, as its line says it."""
    if record.done:
        text = f"[green]done[/] — {headline(record)}"
        if record.save_error:
            text += f" [yellow](model not saved: {record.save_error})[/]"
        return text
    again = {True: "running the recipe again retries it", False: "a re-run fails the same way"}.get(record.rerun_helps)
    return f"[red]failed[/]: {record.error or ''}" + (f" [dim]({again})[/]" if again else "")


class _Counted(ProgressColumn):
    """A column shown only for tasks that count toward a total (not the running cell's line)."""

    def __init__(self, column: ProgressColumn, prefix: str = ""):
        super().__init__()
        self.column, self.prefix = column, prefix

    def render(self, task):
        if task.total is None:
            return Text("")
        shown = self.column.render(task)
        return Text(self.prefix) + shown if self.prefix else shown


class RunDisplay:
    """The run's display on ``console``: live when the console is a terminal, lines otherwise."""

    def __init__(self, console: Console, total: int, in_process: bool = True, quiet: bool = False):
        self.console, self.live, self.quiet = console, console.is_terminal and not quiet, quiet
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), _Counted(BarColumn()),
                                 _Counted(MofNCompleteColumn()), TimeElapsedColumn(),
                                 _Counted(TimeRemainingColumn(), "ETA "), console=console, transient=False,
                                 disable=not self.live)
        self.cells = self.progress.add_task("cells", total=total)
        self.running = None
        self.label = ""
        self.in_process = in_process
        if self.live and not in_process:
            self.running = self.progress.add_task("  cells run in worker processes: a line as each ends", total=None)
        self.cell_progress = CellProgress(self._bar, self._phase)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    # --- a cell's life ---

    def started(self, cell) -> None:
        if self.quiet:
            return
        self.label = cell.label()
        if self.live:
            if self.running is None:
                self.running = self.progress.add_task("", total=None)
            self.progress.update(self.running, description=f"  {self.label}")
        else:
            self.console.print(f"start {self.label}", highlight=False)

    def finished(self, cell, record) -> None:
        self.progress.advance(self.cells)
        if self.quiet:
            return
        self.console.print(f"{cell.label()} — {outcome(record)}", highlight=False)

    def _phase(self, name: str) -> None:
        if self.live and self.running is not None and self.in_process:
            self.progress.update(self.running, description=f"  {self.label} [dim]· {name}[/]")

    def _bar(self, description, total):
        task = self.progress.add_task(f"    {description}", total=total)
        return (lambda n=1: self.progress.advance(task, n)), (lambda: self.progress.remove_task(task))
