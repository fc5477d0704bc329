"""What the bench scripts share: the toy model and data, a plain-TRL GKD run (the script a
user writes today), a step timer and a table printer. Not tests: they print measurements."""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from qcompare.testing import tiny_student  # noqa: E402

torch.set_num_threads(1)


def toy_paths():
    from qcompare.sdk.registry import get_registry

    registry = get_registry()
    return registry.models["toy-qwen3"].obj[0], registry.datasets["toy-chat"].obj[0]


def load_toy():
    """(teacher, tokenizer, data) as a plain script loads them."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, train = toy_paths()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = load_dataset("json", data_files=str(train), split="train")
    return teacher, tokenizer, data


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin to on_step_end)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._t)


# qcompare's own defaults where TRL's differ (TRL: gradient checkpointing on, log every 10 steps)
MATCHED = dict(gradient_checkpointing=False, logging_steps=1, data_seed=0, lr_scheduler_type="cosine",
               logging_nan_inf_filter=False)


def plain_gkd(teacher, tokenizer, data, output_dir, callbacks=(), **args):
    """One plain TRL GKDTrainer run on an int4 fake-quant student (no qcompare code).
    Give ``**MATCHED`` to use qcompare's settings, else TRL's defaults apply."""
    student = tiny_student(teacher)  # torchao int4 (group 32) fake quantization
    config = GKDConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, save_strategy="no",
                       report_to="none", disable_tqdm=True, seed=0, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # as qcompare does: no per-step prints
        trainer.train()
    return trainer


def table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")
