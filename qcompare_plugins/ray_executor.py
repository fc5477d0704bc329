"""Cells as Ray tasks: one cluster (or this machine) runs a sweep, results land in the same run folder.

Each task rebuilds the runner from the recipe and writes its own cell folder, so resume
works exactly as with the local executor: finished cells are never sent again.
"""

from __future__ import annotations

import os

from pydantic import Field

from qcompare import hookimpl
from qcompare.api import Executor, Params
from qcompare.errors import QcompareError


class RayParams(Params):
    address: str = Field("", description="Ray cluster address (ray://host:10001 or auto); empty starts Ray on this machine")
    num_gpus: float = Field(0, ge=0, description="GPUs each cell asks for (fractions share a GPU)")
    num_cpus: float = Field(1, gt=0, description="CPUs each cell asks for")
    local_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use (default: all)")


def _run_remote(job, cell):
    return job(cell)


class RayExecutor(Executor):
    """Run cells as Ray tasks with per-cell GPU/CPU requests, on a cluster or locally."""

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
        finally:
            if started:
                ray.shutdown()


def _forwarded_env() -> dict[str, str]:
    """What a worker needs to find the same plugins and threads as the driver."""
    keys = ("PYTHONPATH", "QCOMPARE_PLUGINS", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")
    return {k: os.environ[k] for k in keys if k in os.environ}


@hookimpl
def register_executors(register):
    register(RayExecutor)
