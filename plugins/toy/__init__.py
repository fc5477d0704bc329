"""The toy world: a tiny Qwen3, its chat data and its lm-eval tasks, all shipped.

On it quantization and distillation show real effects on a laptop CPU. The float teacher
scores 0.98 on the ``toy`` tasks (what the ``toy-chat`` distillation data covers) and on
``toy_uncovered`` (pets and subtraction, held only by its pretraining); torchao round-to-nearest
per channel (head in float) costs INT3 about 0.01 covered and 0.02 uncovered — the study's INT4
regime — and INT2 0.22 and 0.30. ``python -m qcompare_plugins.toy.build`` regenerates everything
(``--check`` compares a rebuild with the shipped files); ``python -m qcompare_plugins.toy.measure``
prints such numbers; docs/paper-in-miniature.md runs the founding study on it. ``toy-qwen3-narrow``
(half the width) is filled by the same world: where toy-qwen3 keeps everything at 4 bits, 4-bit
formats cost it 1.5–3 points and part from one another, so the quantizers twin runs on it.
"""

from pathlib import Path

from qcompare.sdk import hookimpl

HERE = Path(__file__).parent
MODEL = HERE / "model"
MOE_MODEL = HERE / "model-moe"
NARROW_MODEL = HERE / "model-narrow"
TRAIN = HERE / "data" / "train.jsonl"
HELDOUT = HERE / "data" / "heldout.jsonl"
TASKS = HERE / "tasks"


@hookimpl
def register_models(register):
    register("toy-qwen3", MODEL, "2-layer Qwen3 (~180k params) trained from scratch on the toy world")
    register("toy-qwen3-moe", MOE_MODEL, "toy-qwen3 with 8 fused experts (2 per token) in its MLP, trained the same way")
    register("toy-qwen3-narrow", NARROW_MODEL, "toy-qwen3 at half the width (~59k params), trained the same way: "
                                                "at its capacity, so 4-bit formats cost it accuracy")


@hookimpl
def register_datasets(register):
    register("toy-chat", TRAIN, "toy-world chat data (messages): facts, sampled habits, sums, sequences "
                               "(never pets or subtraction)")
    register("toy-heldout", HELDOUT, "toy-world held-out text (text) for perplexity and KL to the teacher")


@hookimpl
def register_task_folders(register):
    register(TASKS)
