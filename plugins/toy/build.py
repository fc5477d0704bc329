"""Build the toy world: data, tokenizer, task files and its three teachers, the dense toy-qwen3,
the mixture-of-experts toy-qwen3-moe (the same world, attention and budget; 8 experts, 2 per token)
and toy-qwen3-narrow (half the width: at its capacity, so 4-bit formats cost it accuracy).

    python -m qcompare_plugins.toy.build [--seed 0] [--out plugins/toy] [--only dense|moe|narrow]
    python -m qcompare_plugins.toy.build --check     # rebuild in a temporary folder, compare with the shipped files

Deterministic for a seed (one thread, seeded torch): the same files byte for byte. Its outputs
are committed, so tests and recipes never retrain; rerun it only when the world changes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from qcompare_plugins.toy.tokenizer import make_tokenizer
from qcompare_plugins.toy.world import World, benchmarks, chat_rows, heldout_texts, make_world, pretrain_texts

HERE = Path(__file__).parent
STEPS, BATCH, LR = 4000, 64, 3e-3


def _shape(tokenizer) -> dict:
    """What the dense and the mixture-of-experts teacher share: width, attention, vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def model_config(tokenizer) -> Qwen3Config:
    """~180k parameters: big enough to learn the world, small enough that int2 hurts."""
    return Qwen3Config(**_shape(tokenizer))


def narrow_config(tokenizer) -> Qwen3Config:
    """toy-qwen3 at half the width (~59k parameters): the world fills it, so its knowledge sits close
    to the decision boundary and 4-bit formats cost it accuracy (1.5–3 points), as they cost a 4B model
    — where toy-qwen3 keeps everything at 4 bits and the formats tie."""
    return Qwen3Config(**{**_shape(tokenizer), "hidden_size": 32, "intermediate_size": 128, "head_dim": 8})


def moe_config(tokenizer) -> Qwen3MoeConfig:
    """toy-qwen3's attention and width with its MLP as 8 experts of width 64, 2 routed per token:
    half the dense model's active MLP width per token, ~1.5× its parameters."""
    return Qwen3MoeConfig(**_shape(tokenizer), moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_world_files(world: World, root: Path) -> None:
    """train.jsonl (chat), heldout.jsonl (text) and one JSONL per lm-eval task."""
    write_jsonl(root / "data" / "train.jsonl", chat_rows(world))
    write_jsonl(root / "data" / "heldout.jsonl", [{"text": t} for t in heldout_texts(world)])
    for task, docs in benchmarks(world).items():
        write_jsonl(root / "tasks" / "data" / f"{task}.jsonl", docs)


def training_texts(world: World, tokenizer) -> list[str]:
    """Plain statements plus the chat rows rendered, so the teacher also speaks chat."""
    chats = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(world)]
    return pretrain_texts(world) + chats


def batches(ids: list[list[int]], pad_id: int, batch: int, rng: random.Random):
    """Endless random batches, right-padded; labels are -100 on padding."""
    while True:
        rows = rng.sample(ids, batch)
        width = max(map(len, rows))
        x = torch.full((batch, width), pad_id)
        labels = torch.full((batch, width), -100)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
        yield x, (x != pad_id).long(), labels


TEACHERS = {"dense": "model", "moe": "model-moe", "narrow": "model-narrow"}  # variant -> folder


def train_teacher(world: World, tokenizer, steps: int = STEPS, log_every: int = 500, variant: str = "dense"):
    """Train from scratch with AdamW, warmup then cosine decay."""
    torch.manual_seed(world.seed)
    model = {"dense": lambda: Qwen3ForCausalLM(model_config(tokenizer)),
             "moe": lambda: Qwen3MoeForCausalLM(moe_config(tokenizer)),
             "narrow": lambda: Qwen3ForCausalLM(narrow_config(tokenizer))}[variant]()
    texts = training_texts(world, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    model.train()
    data = batches(ids, tokenizer.pad_token_id, BATCH, random.Random(world.seed))
    start = time.time()
    for step in range(1, steps + 1):
        x, mask, labels = next(data)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    return model


def build(seed: int = 0, out: Path = HERE, steps: int = STEPS, only: str | None = None) -> Path:
    """Write everything under ``out``; return the (dense) model folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = make_world(seed)
        tokenizer = make_tokenizer()
        write_world_files(world, out)
        for variant, folder in TEACHERS.items():
            if only and only != variant:
                continue
            start = time.perf_counter()
            model = train_teacher(world, tokenizer, steps, variant=variant)
            folder = out / folder
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            print(f"{folder.name}: {steps} steps in {time.perf_counter() - start:.0f} s on one thread", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out / "model"


def check(seed: int = 0) -> list[str]:
    """Rebuild into a temporary folder; the shipped files that differ (none when reproducible)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(seed, root)
        rebuilt = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return [str(f) for f in rebuilt if not (HERE / f).is_file() or (HERE / f).read_bytes() != (root / f).read_bytes()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--only", choices=tuple(TEACHERS), help="train one of the teachers")
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare with the shipped files")
    args = parser.parse_args()
    if args.check:
        differ = check(args.seed)
        print("the rebuild matches the shipped files byte for byte" if not differ else f"differ: {', '.join(differ)}")
        sys.exit(1 if differ else 0)
    print(f"built {build(args.seed, args.out, args.steps, args.only)}")


if __name__ == "__main__":
    main()
