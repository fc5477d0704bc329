"""The default executor: cells one after another in this process."""

from qcompare import hookimpl
from qcompare.api import Executor


class LocalExecutor(Executor):
    """Run cells one after another in this process (the default)."""

    name = "local"

    def run(self, jobs, run_job, params, on_done):
        for job in jobs:
            on_done(job, run_job(job))


@hookimpl
def register_executors(register):
    register(LocalExecutor)
