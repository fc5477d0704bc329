"""The default executor: cells on this machine, one after another or several at once.

With ``workers = N`` the cells go to N worker processes. Each worker rebuilds the runner once
(so it loads a model once, not once per cell) and writes its cells' folders itself, as a Ray
worker does; the run folder's teacher cache is shared through the disk. On a GPU run each
worker sees one GPU (``CUDA_VISIBLE_DEVICES``, worker i takes GPU i mod the GPUs visible),
so ``workers`` = the number of GPUs runs one cell per GPU; more workers than GPUs share them.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from pydantic import Field

from qcompare.sdk import Executor, hookimpl, Params, QcompareError


class LocalParams(Params):
    workers: int = Field(1, ge=1, description="cells run at once on this machine, each in its own process "
                         "(on a GPU run: one GPU per worker)")


class LocalExecutor(Executor):
    """Run cells on this machine: one after another in this process, or in ``workers`` processes."""

    name = "local"
    Params = LocalParams

    def run(self, cells, job, params, on_done):
        if params.workers == 1 or len(cells) <= 1:
            for cell in cells:
                on_done(cell, job(cell))
            return
        if job.processes > 1:
            raise QcompareError("executor local: workers > 1 cannot run under torchrun / accelerate launch "
                                "(data-parallel cells); use workers = 1 there")
        _run_in_workers(cells, job, params.workers, on_done)


def _run_in_workers(cells, job, workers: int, on_done) -> None:
    gpu = job.device == "cuda"
    gpus = _visible_gpus() if gpu else []
    # fork is instant and safe while this process has not touched CUDA (a CPU run);
    # a GPU run starts clean workers that pick their GPU before CUDA starts
    context = multiprocessing.get_context("spawn" if gpu else "fork")
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // workers)
    todo = list(cells)
    while todo:  # a new pool after a worker died; the cells it was running are failed, the rest go on
        left = _pool_round(todo, job, workers, context, gpus, threads, on_done)
        if len(left) == len(todo):  # no cell even started: the workers die on their own
            raise QcompareError(f"executor local: the worker processes died before running any cell ({len(left)} "
                                "left pending); their error is printed above, or run with workers = 1 to see it")
        todo = left


def _pool_round(cells, job, workers, context, gpus, threads, on_done) -> list:
    """Run ``cells`` in one pool; return the ones not started when a worker died (else [])."""
    slots = context.Queue()
    for i in range(workers):
        slots.put(i)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(job, slots, gpus, threads))
    pending, not_started = {}, []
    try:
        for i, cell in enumerate(cells):
            try:
                pending[pool.submit(_run_cell, cell)] = cell
            except BrokenProcessPool:  # a worker already died: the rest wait for the next pool
                not_started += cells[i:]
                break
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                cell = pending.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    record = _lost(job, cell)
                    if record is None:
                        not_started.append(cell)
                        continue
                on_done(cell, record)
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return not_started


def _lost(job, cell):
    """A cell whose worker died (killed, out of memory): failed if it had started, else None."""
    if job.status(cell) == "running":
        return job.fail(cell, "a worker process died while this cell ran (killed or out of memory; "
                              "a pool's running cells end with it): run the recipe again to retry")
    return None


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


_job = None  # the worker's job, whose runner it builds once and keeps


def _start_worker(job, slots, gpus, threads) -> None:
    global _job
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    import torch

    if threads:
        torch.set_num_threads(threads)
    _job = job
    _job.start_process()


def _run_cell(cell):
    return _job(cell)


@hookimpl
def register_executors(register):
    register(LocalExecutor)
