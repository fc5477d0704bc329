"""What a training cell cost, measured rather than guessed.

Wall time is split by where it went (rollout generation, teacher forward, student
forward+backward, the rest); token counts come from the attention masks the models
actually saw; FLOPs are an *estimate* (2·params·tokens per forward, 6·params·tokens per
trained token, attention ignored), labelled as such in the result.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
import warnings
from pathlib import Path

from qcompare.sdk import logical_flops, write_json

# Counters that accumulate over a cell and survive a resume (saved next to each checkpoint).
COUNTERS = (
    "step_seconds",  # wall time inside training_step: rollout + teacher forward + student fwd/bwd
    "rollout_seconds",  # generate() for on-policy (student) or seq_kd (teacher) sequences
    "teacher_forward_seconds",
    "tokens_generated",  # completion tokens kept (up to and including EOS)
    "rollout_tokens",  # prompt + completion tokens that went through generate()
    "student_rollout_tokens",  # the part of rollout_tokens the student generated
    "teacher_tokens",  # tokens through the teacher's forward
    "teacher_forwards",  # teacher forward calls (a batch served from the teacher cache makes none)
    "teacher_cached_tokens",  # tokens whose teacher logits came from the run's teacher cache
    "teacher_cached_batches",  # batches served from the cache: teacher forwards not made
    "teacher_head_seconds",  # recomputing the head's logits from cached hidden states
    "teacher_head_flops",  # 2·vocab·hidden per token of those batches (spent, not logical)
    "student_tokens",  # tokens through the student's forward+backward
    "train_seconds",  # wall time of trainer.train(), summed over resumed runs
    "loop_seconds",  # the part of train_seconds spent in the step loop (after set-up)
    "steps",
)
SAVED_NAME = "qcompare_cost.json"
# The counters each data-parallel process counts for its own shard of the batch (the rest are
# wall times and steps, the same in every process).
PER_PROCESS = ("tokens_generated", "rollout_tokens", "student_rollout_tokens", "teacher_tokens", "teacher_forwards",
               "teacher_cached_tokens", "teacher_cached_batches", "student_tokens", "teacher_head_flops")


class CostMeter:
    """Accumulates timers and token counts for one cell."""

    def __init__(self, device: str):
        self.device = device
        self.totals = {k: 0.0 for k in COUNTERS}
        self.running: dict[str, float] = {}  # open timers: key -> perf_counter() at start

    def add(self, key: str, value) -> None:
        self.totals[key] += float(value)

    @contextlib.contextmanager
    def time(self, key: str):
        # CUDA work is asynchronous: without a sync the time would land in whichever
        # later call happens to wait for it.
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[key] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    def start(self, key: str) -> None:
        """Open a timer that spans callbacks (closed by ``stop``)."""
        self.running[key] = time.perf_counter()

    def stop(self, key: str) -> None:
        if key in self.running:
            self.totals[key] += time.perf_counter() - self.running.pop(key)

    def save(self, folder: Path) -> None:
        totals = dict(self.totals)
        for key, start in self.running.items():  # time so far, for a cell resumed from here
            totals[key] += time.perf_counter() - start
        # atomic: a crash while writing leaves the previous file (or none), never half a JSON
        write_json(Path(folder) / SAVED_NAME, totals)

    def load(self, folder: Path) -> None:
        """Add the cost saved beside a checkpoint. An unreadable file (a checkpoint written by an
        older version mid-crash) costs the measurement, not the cell: the count restarts at zero."""
        path = Path(folder) / SAVED_NAME
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"a JSON {type(saved).__name__}, not an object")
            totals = {k: float(saved[k]) for k in COUNTERS if k in saved}
        except (OSError, ValueError, TypeError) as e:
            warnings.warn(f"{path} is unreadable ({type(e).__name__}: {e}); the cost of the resumed cell "
                          "counts from zero (train_seconds, tokens and steps before the resume are missing)",
                          stacklevel=2)
            return
        self.totals.update(totals)

    def sum_processes(self, accelerator) -> int:
        """Make the token counters the whole cell's under data parallelism (every process
        takes part); returns the number of processes."""
        n = accelerator.num_processes
        if n > 1:
            import torch

            counts = torch.tensor([self.totals[k] for k in PER_PROCESS], dtype=torch.float64, device=accelerator.device)
            counts = accelerator.reduce(counts, reduction="sum")
            self.totals.update(zip(PER_PROCESS, counts.tolist()))
        return n

    def summary(self, student_params: int, teacher_params: int) -> dict:
        """The ``cost`` dict of a DistillResult."""
        t = self.totals
        steps = int(t["steps"])
        student_seconds = max(t["step_seconds"] - t["rollout_seconds"] - t["teacher_forward_seconds"], 0.0)
        teacher_rollout_tokens = t["rollout_tokens"] - t["student_rollout_tokens"]
        teacher_logical = t["teacher_tokens"] + t["teacher_cached_tokens"]

        def flops(teacher_tokens):
            return logical_flops(student_params, teacher_params, {
                "student_tokens": t["student_tokens"], "teacher_tokens": teacher_tokens,
                "student_rollout_tokens": t["student_rollout_tokens"], "teacher_rollout_tokens": teacher_rollout_tokens})

        return {
            "train_seconds": round(t["train_seconds"], 4),
            "steps": steps,
            # rates over the step loop: set-up (optimizer, checkpoint loading) is apart
            "setup_seconds": round(max(t["train_seconds"] - t["loop_seconds"], 0.0), 4),
            "steps_per_second": round(steps / t["loop_seconds"], 4) if t["loop_seconds"] else 0.0,
            "seconds_per_step": round(t["loop_seconds"] / steps, 4) if steps else 0.0,
            "rollout_seconds": round(t["rollout_seconds"], 4),
            "teacher_forward_seconds": round(t["teacher_forward_seconds"], 4),
            "student_forward_backward_seconds": round(student_seconds, 4),
            # in the loop but outside training_step: optimizer, data loading, logging, checkpoints
            "other_seconds": round(max(t["loop_seconds"] - t["step_seconds"], 0.0), 4),
            "tokens_generated": int(t["tokens_generated"]),
            # the method's logical work (as if nothing were cached), then what this run computed
            "teacher_tokens_logical": int(teacher_logical),
            "teacher_forwards_logical": int(t["teacher_forwards"] + t["teacher_cached_batches"]),
            "teacher_tokens": int(t["teacher_tokens"]),
            "teacher_forwards": int(t["teacher_forwards"]),
            "teacher_cached_tokens": int(t["teacher_cached_tokens"]),
            "student_tokens": int(t["student_tokens"]),
            "rollout_tokens": int(t["rollout_tokens"]),
            "student_params": student_params,
            "teacher_params": teacher_params,
            "flops": float(flops(teacher_logical)),
            "flops_spent": float(flops(t["teacher_tokens"]) + t["teacher_head_flops"]),
            "teacher_head_seconds": round(t["teacher_head_seconds"], 4),
            "flops_method": "logical estimate: 6*params*tokens for trained student tokens, 2*params*tokens for "
            "teacher forwards (cached ones included; flops_spent leaves them out but counts the head recomputed "
            "from cached hidden states) and rollout tokens "
            "(prompt+completion, KV cache assumed); attention ignored",
            **peak_memory(self.device),
        }


def peak_memory(device: str) -> dict:
    """Peak memory at the end of training: the CUDA allocator's peak on a GPU (not reset
    here, so the runner's own whole-cell peak stays right), else the process's peak RSS.
    Named ``train_*`` so the runner's ``peak_memory_bytes`` does not overwrite it."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return {"train_peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                "train_peak_memory_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the whole process's peak so far,
    # not this cell's alone.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"train_peak_memory_bytes": int(rss * scale), "train_peak_memory_kind": "process_peak_rss"}


def zero_cost() -> dict:
    """The cost of a distiller that does not train."""
    return {"train_seconds": 0.0, "steps": 0, "tokens_generated": 0, "teacher_tokens": 0, "student_tokens": 0,
            "flops": 0.0, "flops_spent": 0.0}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
