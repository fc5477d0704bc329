"""The toy world: a tiny Qwen3, its chat data and its lm-eval tasks, all shipped.

On it quantization and distillation show real effects on a laptop CPU: the float
teacher scores ~0.97 on the ``toy`` tasks, torchao int2 round-to-nearest (per channel)
loses 0.2-0.25 of that, and 300 steps of distillation win back two thirds of the loss.
``python -m qcompare_plugins.toy.build`` regenerates everything;
``python -m qcompare_plugins.toy.measure`` prints those numbers.
"""

from pathlib import Path

from qcompare import hookimpl

HERE = Path(__file__).parent
MODEL = HERE / "model"
MOE_MODEL = HERE / "model-moe"
TRAIN = HERE / "data" / "train.jsonl"
HELDOUT = HERE / "data" / "heldout.jsonl"
TASKS = HERE / "tasks"


@hookimpl
def register_models(register):
    register("toy-qwen3", MODEL, "2-layer Qwen3 (~180k params) trained from scratch on the toy world")
    register("toy-qwen3-moe", MOE_MODEL, "toy-qwen3 with 8 fused experts (2 per token) in its MLP, trained the same way")


@hookimpl
def register_datasets(register):
    register("toy-chat", TRAIN, "toy-world chat data (messages): facts, sampled habits, sums, sequences")
    register("toy-heldout", HELDOUT, "toy-world held-out text (text) for perplexity and KL to the teacher")


@hookimpl
def register_task_folders(register):
    register(TASKS)
