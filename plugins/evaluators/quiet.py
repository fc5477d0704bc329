"""Keep lm-eval quiet, route its progress to the cell's bar, and leave global state as found.

lm-eval logs dozens of INFO/WARNING lines per task, draws its own tqdm bars, runs
``git describe`` (printing "fatal: not a git repository" outside a repo) and seeds
Python's, NumPy's and torch's global RNGs in every ``simple_evaluate`` call.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Callable, Iterator
from unittest import mock


def verbose() -> bool:
    """lm-eval speaks only when qcompare's own logger is at DEBUG (``qcompare -v``)."""
    return logging.getLogger("qcompare").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    if verbose():
        yield
        return
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars_off = datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def without_environment_report() -> Iterator[None]:
    """``simple_evaluate`` without the environment report it appends to every result: torch's
    ``collect_env`` (pip, nvidia-smi, some 50 subprocesses) and the git hash, ~1.3 s a call on two CPU
    cores — most of a toy cell's evaluation — for fields qcompare never reads (its provenance records
    the environment once per cell)."""
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        for name, stand_in in (("add_env_info", lambda storage: None), ("get_git_commit_hash", lambda: None)):
            if hasattr(lm_eval.evaluator, name):
                stack.enter_context(mock.patch.object(lm_eval.evaluator, name, stand_in))
        yield


@contextlib.contextmanager
def kept_rng_state() -> Iterator[None]:
    """Restore the global RNGs lm-eval reseeds, so evaluating never changes later training."""
    import numpy as np
    import torch

    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def progress_through(open_bar: Callable[[str, int | None], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Replace lm-eval's tqdm bars: its request loops advance bars opened by ``open_bar(kind, total)``.

    A bar opens lazily at lm-eval's "Running <kind> requests" loop, the first moment the
    number of requests is known: one bar per request kind (loglikelihood, generate_until).
    Batched loops of one kind (loglikelihood_rolling) keep advancing the bar already open.
    """
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    state: dict = {}

    def advance(n: int) -> None:
        if "advance" in state:
            state["advance"](n)

    class Bar:
        def __init__(self, iterable=None, total=None, desc=None, **_):
            self.iterable = iterable
            if total is None and hasattr(iterable, "__len__"):
                total = len(iterable)
            self.counts = bool(desc and desc.startswith("Running"))
            if self.counts and state.get("desc") != desc:
                if "bar" in state:
                    state["bar"].close()
                state["bar"] = contextlib.ExitStack()
                state["advance"] = state["bar"].enter_context(open_bar(desc.split()[1], total))
                state["desc"] = desc

        def __iter__(self):
            for item in self.iterable:
                yield item
                if self.counts:
                    advance(1)

        def update(self, n=1):
            if self.counts:
                advance(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self, *a, **k):
            pass

        set_description = set_postfix = refresh = write = close

    with contextlib.ExitStack() as patches:
        for module in (lm_eval.models.huggingface, lm_eval.api.model, lm_eval.api.task):
            if hasattr(module, "tqdm"):
                patches.enter_context(mock.patch.object(module, "tqdm", Bar))
        try:
            yield
        finally:
            if "bar" in state:
                state["bar"].close()
