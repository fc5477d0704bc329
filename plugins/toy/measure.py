"""Measure the toy world's effects: float teacher, round-to-nearest, and recovery by
distillation (forward KL from the teacher) versus SFT (cross-entropy on the labels), on the
knowledge the chat data covers (``mean``) and on what it does not (``uncovered``).

    python -m qcompare_plugins.toy.measure [--seeds 0 1 2] [--steps 300] [--bits 2] [--group 0]

Seed 0 uses the shipped model (plugins/toy/model); other seeds build a world and
teacher in a temporary folder first. Multiple-choice accuracy is scored here by summed
log-likelihood of each choice, which is what lm-eval's ``acc`` computes (the tests check
the shipped model through lm-eval itself).
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from qcompare_plugins.toy.build import HERE, build
from qcompare_plugins.toy.world import HABITS, benchmarks, chat_rows, heldout_texts, make_world

MC_TASKS = ("toy_facts", "toy_habits", "toy_arith", "toy_seq")
UNCOVERED = ("toy_lore", "toy_minus")  # in the pretraining text only, never in the chat data


@torch.no_grad()
def mc_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Share of docs whose gold choice has the highest summed log-likelihood."""
    seqs, spans = [], []
    for doc in docs:
        ctx = tokenizer(doc["query"], add_special_tokens=False)["input_ids"]
        for choice in doc["choices"]:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
    scores = []
    for i in range(0, len(seqs), 512):
        chunk = seqs[i : i + 512]
        width = max(map(len, chunk))
        x = torch.full((len(chunk), width), tokenizer.pad_token_id)
        for j, s in enumerate(chunk):
            x[j, : len(s)] = torch.tensor(s)
        logp = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long()).logits.float().log_softmax(-1)
        for j, s in enumerate(chunk):
            a, b = spans[i + j]
            scores.append(sum(logp[j, t - 1, s[t]].item() for t in range(a, b)))
    correct = [max(range(4), key=lambda k: scores[4 * d + k]) == doc["gold"] for d, doc in enumerate(docs)]
    return sum(correct) / len(correct)


@torch.no_grad()
def kl_to_teacher(teacher, model, tokenizer, texts: list[str], position: int | None = None) -> float:
    """Mean per-token KL(teacher || model) over ``texts`` (nats); at one position only
    (the prediction of token ``position``) when given."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tokenizer.pad_token_id)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r)
    mask = (x != tokenizer.pad_token_id).long()
    t_logp = teacher(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)
    s_logp = model(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[:, :-1]
    keep = mask[:, 1:].bool()
    if position is not None:
        keep = torch.zeros_like(keep)
        keep[:, position - 1] = True
    return (kl[keep].sum() / keep.sum()).item()


def evaluate(model, tokenizer, tasks: dict[str, list[dict]], teacher=None, heldout: dict | None = None) -> dict[str, float]:
    """MC accuracy per task, the mean of the covered ones and of the uncovered ones; KL to the
    teacher on each held-out split."""
    model.eval()
    acc = {t: mc_accuracy(model, tokenizer, tasks[t]) for t in MC_TASKS + UNCOVERED}
    acc["mean"] = sum(acc[t] for t in MC_TASKS) / len(MC_TASKS)
    acc["uncovered"] = sum(acc[t] for t in UNCOVERED) / len(UNCOVERED)
    acc["usual"] = mc_accuracy(model, tokenizer, tasks["toy_usual"])
    if heldout:
        acc["kl"] = kl_to_teacher(teacher, model, tokenizer, heldout["kl"])
        acc["kl_habit"] = kl_to_teacher(teacher, model, tokenizer, heldout["kl_habit"], position=2)
    return acc


def heldout_splits(world) -> dict[str, list]:
    """Held-out text, and the KL at the habit's value alone ("zorb drinks | tea ."): the
    uncertain part, where only the teacher's soft targets say how often each is right."""
    texts = heldout_texts(world)
    return {"kl": texts, "kl_habit": [t for t in texts if any(f" {a} " in t for a in HABITS)]}


def int_config(bits: int, group: int | None):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group) if group else PerAxis(0)
    )


def fake_quant_student(teacher, bits: int, group: int | None):
    """A copy of the teacher whose Linear layers (lm_head included) fake-quantize with
    round-to-nearest; gradients pass straight through."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)  # the teacher is frozen; its copy must train
    quantize_(student, QATConfig(int_config(bits, group), step="prepare"))
    return student


def convert(student, bits: int, group: int | None):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(student, QATConfig(int_config(bits, group), step="convert"))
    return student


def chat_batches(tokenizer, rows: list[dict], batch: int, seed: int):
    """Endless random batches of rendered chats; ``completion`` marks the last answer."""
    rng = random.Random(seed)
    encoded = []
    for r in rows:
        full = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        prompt = tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        encoded.append((ids, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    while True:
        chunk = rng.sample(encoded, batch)
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((batch, width), tokenizer.pad_token_id)
        completion = torch.zeros((batch, width), dtype=torch.bool)
        for i, (ids, n_prompt) in enumerate(chunk):
            x[i, : len(ids)] = torch.tensor(ids)
            completion[i, n_prompt : len(ids)] = True
        yield x, completion


def recover(teacher, student, tokenizer, rows, method: str, steps: int, lr: float, seed: int, batch: int = 16):
    """Train the fake-quant student on the answers of the chat rows.

    ``kd``: forward KL(teacher || student) per answer token (GKD with lmbda=0, beta=0);
    ``sft``: cross-entropy on the reference answer tokens."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    # Linear decay to zero, as HF Trainer does: late steps with a full learning rate keep
    # flipping int2 roundings back and forth.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
    student.train()
    data = chat_batches(tokenizer, rows, batch, seed)
    for _ in range(steps):
        x, completion = next(data)
        mask = (x != tokenizer.pad_token_id).long()
        logits = student(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        target_mask = completion[:, 1:]
        if method == "kd":
            with torch.no_grad():
                t_logp = teacher(input_ids=x, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            kl = (t_logp.exp() * (t_logp - logits.log_softmax(-1))).sum(-1)
            loss = kl[target_mask].mean()
        else:
            loss = F.cross_entropy(logits[target_mask], x[:, 1:][target_mask])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    student.eval()
    return student


def measure_seed(seed: int, folder: Path, bits: int, group: int | None, steps: int, lr: float) -> dict[str, dict]:
    world = make_world(seed)
    tasks = benchmarks(world)
    rows = chat_rows(world)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    heldout = heldout_splits(world)
    out = {"float": evaluate(teacher, tokenizer, tasks, teacher, heldout)}
    out["rtn"] = evaluate(fake_quant_student(teacher, bits, group), tokenizer, tasks, teacher, heldout)
    for method in ("kd", "sft"):
        start = time.time()
        student = recover(teacher, fake_quant_student(teacher, bits, group), tokenizer, rows, method, steps, lr, seed)
        seconds = time.time() - start
        out[method] = evaluate(student, tokenizer, tasks, teacher, heldout)
        out[method]["seconds"] = seconds
        out[method + "+convert"] = evaluate(convert(student, bits, group), tokenizer, tasks, teacher, heldout)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=0, help="group size; 0 (default) for per-channel")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rebuild", action="store_true", help="build seed 0 too instead of using the shipped model")
    parser.add_argument("--worlds", type=Path, help="keep built worlds here and reuse them on the next run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = (*MC_TASKS, "mean", *UNCOVERED, "uncovered", "usual", "kl", "kl_habit")
    header = f"{'seed':>4} {'model':<12}" + "".join(f"{t.removeprefix('toy_'):>9}" for t in columns)
    print(header)
    args.group = args.group or None
    summary = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            shipped = HERE / "model"
            root = args.worlds / f"seed{seed}" if args.worlds else Path(tmp)
            if seed == 0 and not args.rebuild and shipped.exists():
                folder = shipped
            elif (root / "model" / "config.json").exists():
                folder = root / "model"  # built by an earlier run with --worlds
            else:
                folder = build(seed, root)
            result = measure_seed(seed, folder, args.bits, args.group, args.steps, args.lr)
        for name, acc in result.items():
            print(f"{seed:>4} {name:<12}" + "".join(f"{acc[t]:9.3f}" for t in columns), flush=True)
        drop = result["float"]["mean"] - result["rtn"]["mean"]
        for m in ("kd", "sft"):
            rec = (result[m]["mean"] - result["rtn"]["mean"]) / drop if drop > 0 else float("nan")
            print(f"{seed:>4} {m} recovers {rec:.0%} of the {drop:.3f} drop in {result[m]['seconds']:.0f}s")
            summary.append((seed, m, drop, rec))
    print("summary: " + "; ".join(f"seed {s} {m} drop {d:.3f} recovered {r:.0%}" for s, m, d, r in summary))


if __name__ == "__main__":
    main()
