"""Small plugins for the core tests: a seeded test distiller, a seedless one, an evaluator.

Importable as the module ``testplugins`` (conftest registers it in-process; the
subprocess tests install it as a distribution with an entry point).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from pydantic import Field

from qcompare import hookimpl
from qcompare.sdk.api import Distiller, DistillResult, EvalResult, Evaluator, Items, Params


class NudgeParams(Params):
    max_steps: int = Field(2, ge=0, description="SGD steps")
    learning_rate: float = Field(1e-2, gt=0, description="step size")
    fail: bool = Field(False, description="raise inside the cell (tests failure handling)")
    sleep: float = Field(0.0, ge=0, description="seconds to wait per step (tests interruption)")
    kill_once: str = Field("", description="a marker file: if it is missing, create it and SIGKILL this process "
                           "(a worker that dies, as if out of memory)")


class Nudge(Distiller):
    """Test distiller: a few SGD steps of KL(teacher‖student) on seeded random tokens."""

    name = "nudge"
    Params = NudgeParams

    def distill(self, student, params, context):
        teacher = context.teacher
        if params.fail:
            raise RuntimeError("nudge was asked to fail")
        if params.kill_once and not Path(params.kill_once).exists():
            Path(params.kill_once).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        gen = torch.Generator().manual_seed(context.seed or 0)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=params.learning_rate)
        log = []
        student.train()
        with context.progress.task("nudge", total=params.max_steps) as advance:
            for step in range(params.max_steps):
                ids = torch.randint(3, teacher.config.vocab_size, (2, 8), generator=gen)
                with torch.no_grad():
                    t = teacher(ids).logits.log_softmax(-1)
                s = student(ids).logits.log_softmax(-1)
                loss = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                log.append({"step": step + 1, "loss": loss.item()})
                time.sleep(params.sleep)
                advance(1)
        student.eval()
        return DistillResult(student, log, {"train_steps": params.max_steps})


class Keep(Distiller):
    """Test distiller: no training (the result cannot depend on the seed)."""

    name = "keep"
    seeded = False

    def distill(self, student, params, context):
        return DistillResult(student)


class ProbeParams(Params):
    sequences: int = Field(4, gt=0, description="random sequences scored")


class Probe(Evaluator):
    """Test evaluator: KL to the teacher and top-1 agreement on fixed random tokens."""

    name = "probe"
    Params = ProbeParams

    def evaluate(self, model, params, context):
        tokenizer = context.tokenizer
        ids = torch.randint(3, context.teacher.config.vocab_size, (params.sequences, 8),
                            generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            t = context.teacher(ids).logits.float().log_softmax(-1)
            s = model(ids).logits.float().log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1).mean(-1)
        agree = (t.argmax(-1) == s.argmax(-1)).float().mean(-1)
        return EvalResult(metrics={"probe/kl": kl.mean().item(), "probe/acc": agree.mean().item()},
                          items={"probe": Items([f"seq{i}" for i in range(params.sequences)],
                                               {"acc": agree.tolist(), "kl": kl.tolist()})})


@hookimpl
def register_distillers(register):
    register(Nudge)
    register(Keep)


@hookimpl
def register_evaluators(register):
    register(Probe)
