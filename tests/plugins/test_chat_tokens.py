"""The gkd distiller's collator tokenizes each chat once per process: its batches must be
TRL's DataCollatorForChatML batches, tensor for tensor, on a word-level and a ByteLevel BPE
tokenizer, with and without truncation, on the first sight of a chat and on reuse."""

from __future__ import annotations

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast
from trl.experimental.utils import DataCollatorForChatML

from qcompare.testing import CHAT_TEMPLATE, tiny_chat, tiny_tokenizer
from qcompare_plugins.distillers.chat_tokens import STORE, ReusedChatCollator


def byte_level_tokenizer():
    texts = [" ".join(m["content"] for m in row["messages"]) for row in tiny_chat(48)] + ["héllo wörld ünïcode 数字"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<pad>", "<|end|>", "<|user|>", "<|assistant|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<|end|>",
                                  chat_template=CHAT_TEMPLATE)
    from trl.experimental.utils import is_byte_level_tokenizer

    assert is_byte_level_tokenizer(tok.backend_tokenizer)  # the offsets path of TRL's collator
    return tok


def rows():
    data = tiny_chat(12).to_list()
    data.append({"messages": [{"role": "user", "content": "what is héllo 数字"},
                              {"role": "assistant", "content": "maybe wörld"}]})
    data.append({"messages": [{"role": "user", "content": "what is 1 plus 2"}, {"role": "assistant", "content": ""}]})
    return data


@pytest.mark.parametrize("make,max_length", [(tiny_tokenizer, 64), (tiny_tokenizer, 9), (byte_level_tokenizer, 64),
                                             (byte_level_tokenizer, 12)],
                         ids=["word-level", "word-level-truncated", "byte-level", "byte-level-truncated"])
def test_batches_equal_trls_collator_first_time_and_reused(make, max_length):
    tokenizer = make()
    stock = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)
    reused = ReusedChatCollator(tokenizer=tokenizer, max_length=max_length)
    data = rows()
    batches = [data[i:i + 4] for i in range(0, len(data), 4)] + [data[::-1][:5], data[3:9]]
    for batch in batches + batches:  # the second pass comes entirely from the store
        want, got = stock(batch), reused(batch)
        assert want.keys() == got.keys()
        for key in want:
            assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    assert len(STORE.table(tokenizer, max_length)) == len(data)
    if max_length < 64:  # truncation happened (TRL keeps the last max_length tokens)
        assert max(int(m.sum()) for m in stock(data)["attention_mask"]) == max_length


def test_a_chat_is_tokenized_once_per_tokenizer_and_max_length(monkeypatch):
    tokenizer = tiny_tokenizer()
    calls = []
    template = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or template(*a, **k))
    data = rows()[:4]
    ReusedChatCollator(tokenizer=tokenizer, max_length=64)(data)
    first = len(calls)
    assert first == 2 * len(data)  # TRL templates the prompt and the whole chat
    ReusedChatCollator(tokenizer=tokenizer, max_length=64)(data[::-1])  # a later cell, same tokenizer
    assert len(calls) == first
    ReusedChatCollator(tokenizer=tokenizer, max_length=32)(data)  # another max_length is other tokens
    assert len(calls) == 2 * first
