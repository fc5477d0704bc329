"""Cells on Ray: one cluster (or this machine) runs a sweep, results land in the same run folder.

By default each worker slot is a resident actor (one per GPU on a GPU cluster): it builds its
runner once and keeps the teacher, tokenizer and data across the cells it runs, as the local
executor's workers do, instead of reloading them for every cell. An actor that dies (killed,
out of memory, its node lost) loses only the cell it was running, which is stored as failed;
a new actor takes its place for the cells left. Each cell writes its own folder, so resume works
exactly as with the local executor: finished cells are never sent again. ``resident = false``
runs one Ray task per cell (every cell reloads its inputs).
"""

from __future__ import annotations

import os

from pydantic import Field

from qcompare.sdk import Executor, hookimpl, Params, QcompareError


class RayParams(Params):
    address: str = Field("", description="Ray cluster address (ray://host:10001 or auto); empty starts Ray on this machine")
    num_gpus: float = Field(0, ge=0, description="GPUs each cell asks for (fractions share a GPU)")
    num_cpus: float = Field(1, gt=0, description="CPUs each cell asks for")
    local_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use (default: all)")
    resident: bool = Field(True, description="long-lived actors that keep the teacher and data across cells; "
                           "false: a task per cell")
    workers: int | None = Field(None, ge=1, description="resident actors (default: as many as the cluster's "
                                "CPUs or GPUs fit at num_cpus / num_gpus each, at most one per cell)")


def _run_remote(job, cell):
    return job(cell)


class CellWorker:
    """A resident worker: the job's runner, built once in this process, runs cell after cell."""

    def __init__(self, job):
        self.job = job
        self.job.start_process()

    def run(self, cell):
        return self.job(cell)


class RayExecutor(Executor):
    """Run cells on Ray, in resident actors (or a task each) with per-cell GPU/CPU requests, on a cluster or locally."""

    name = "ray"
    Params = RayParams

    def run(self, cells, job, params, on_done):
        # Keep a local Ray on loopback: without this Ray binds the external interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise QcompareError("the ray executor needs Ray: pip install 'ray[default]==2.60.0'") from None
        started = not ray.is_initialized()
        if started:
            kwargs = {"address": params.address} if params.address else {"num_cpus": params.local_cpus,
                                                                           "include_dashboard": False}
            ray.init(log_to_driver=False, runtime_env={"env_vars": _forwarded_env()}, **kwargs)
        try:
            if params.resident:
                _run_actors(ray, cells, job, params, on_done)
            else:
                _run_tasks(ray, cells, job, params, on_done)
        finally:
            if started:
                ray.shutdown()


def _run_tasks(ray, cells, job, params, on_done) -> None:
    task = ray.remote(num_gpus=params.num_gpus, num_cpus=params.num_cpus, max_retries=0)(_run_remote)
    pending = {task.remote(job, cell): cell for cell in cells}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # the worker died (OOM, node lost): store that
            record = job.fail(cell, f"Ray task failed: {str(e).splitlines()[0]}")
        on_done(cell, record)


def _slots(ray, params, cells) -> int:
    if params.workers:
        return min(params.workers, len(cells))
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // params.num_cpus)
    if params.num_gpus:
        fits = min(fits, int(resources.get("GPU", 0) // params.num_gpus))
    return max(1, min(fits, len(cells)))


def _run_actors(ray, cells, job, params, on_done) -> None:
    actor = ray.remote(num_gpus=params.num_gpus, num_cpus=params.num_cpus, max_restarts=0)(CellWorker)
    todo = list(cells)
    busy: dict = {}  # future -> (actor, cell)
    idle = [actor.remote(job) for _ in range(_slots(ray, params, cells))]
    while todo or busy:
        while idle and todo:
            worker, cell = idle.pop(), todo.pop(0)
            busy[worker.run.remote(cell)] = (worker, cell)
        ready, _ = ray.wait(list(busy), num_returns=1)
        worker, cell = busy.pop(ready[0])
        try:
            record = ray.get(ready[0])
            idle.append(worker)
        except ray.exceptions.RayError as e:  # the actor died with this cell: store it, replace the actor
            record = job.fail(cell, f"Ray worker died: {str(e).splitlines()[0]}; running the recipe again retries it")
            ray.kill(worker, no_restart=True)
            if todo:
                idle.append(actor.remote(job))
        on_done(cell, record)


def _forwarded_env() -> dict[str, str]:
    """What a worker needs to find the same plugins and threads as the driver."""
    keys = ("PYTHONPATH", "QCOMPARE_PLUGINS", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")
    return {k: os.environ[k] for k in keys if k in os.environ}


@hookimpl
def register_executors(register):
    register(RayExecutor)
