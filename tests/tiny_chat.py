"""A tiny chat world for the distiller tests: word-level tokenizer with a chat template,
a 2-layer Qwen3 teacher built from config, a torchao fake-quant student and a little
``messages`` dataset. Everything is built in-process (no hub, no files)."""

from __future__ import annotations

import copy
import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from qcompare.sdk.api import CellContext, CellProgress

SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>"]
WORDS = ["what", "is", "plus", "it", "maybe"] + [str(i) for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE, model_max_length=64,
    )


def make_teacher(tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    # a sharper-than-init teacher, so divergences are not all near zero
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


def make_student(teacher, fake_quant: bool = True, skip_head: bool = False):
    """A trainable copy; with fake_quant its Linear layers are torchao int4 QAT (group 32)."""
    student = copy.deepcopy(teacher).train()
    if fake_quant:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.qat import QATConfig

        base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        keep = (lambda m, fqn: fqn != "lm_head" and isinstance(m, torch.nn.Linear)) if skip_head else None
        quantize_(student, QATConfig(base, step="prepare"), filter_fn=keep)
    return student


def make_data(n: int = 24, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(20), rng.randrange(20)
        answer = f"it is {a + b}" if rng.random() < 0.7 else f"maybe {a + b}"
        rows.append({"messages": [
            {"role": "user", "content": f"what is {a} plus {b}"},
            {"role": "assistant", "content": answer},
        ]})
    return Dataset.from_list(rows)


def make_context(tmp_path, seed: int = 0, progress: CellProgress | None = None, tokenizer=None, **fields) -> CellContext:
    return CellContext(
        cell_dir=tmp_path, seed=seed, device="cpu", tokenizer=tokenizer,
        progress=progress or CellProgress(), **fields,
    )
