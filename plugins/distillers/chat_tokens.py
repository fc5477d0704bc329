"""TRL's chat collator, tokenizing each chat once per process instead of once per batch.

``DataCollatorForChatML`` applies the chat template and tokenizes every example of every
batch. The tokens depend only on the chat, the tokenizer and ``max_length``, so a sweep's
cells (and every epoch after the first) can reuse them: the first time a chat is seen the
stock collator processes it alone, and its result is kept compactly and handed back to the
stock collator in the pre-tokenized form it accepts (``input_ids`` + ``completion_mask``).
The batch is the same tensors, byte offsets included (tests/plugins/test_chat_tokens.py).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from trl.experimental.utils import DataCollatorForChatML

# ULD's source-text fields travel with a pre-tokenized example as they do with a raw one
PASSED_ON = ("original_prompt_text", "original_completion_text")


@dataclass
class Tokenized:
    ids: np.ndarray  # int64 token ids after truncation
    prompt: int  # how many of them are the prompt
    offsets: np.ndarray  # [n, 2] int64 completion-relative byte offsets (zeros for non-ByteLevel tokenizers)


class _Store:
    """Per tokenizer and max_length: chat key -> Tokenized. Two kept at a time (a sweep uses one)."""

    def __init__(self):
        self.tables: OrderedDict = OrderedDict()

    def table(self, tokenizer, max_length) -> dict:
        key = (id(tokenizer), max_length)
        entry = self.tables.get(key)
        if entry is None or entry[0] is not tokenizer:  # an id can be reused once its tokenizer is gone
            entry = self.tables[key] = (tokenizer, {})
            while len(self.tables) > 2:
                self.tables.popitem(last=False)
        self.tables.move_to_end(key)
        return entry[1]


STORE = _Store()


class ReusedChatCollator(DataCollatorForChatML):
    """``DataCollatorForChatML`` with each chat tokenized once per process (same batches)."""

    def __call__(self, examples):
        table = STORE.table(self.tokenizer, self.max_length)
        ready = []
        for example in examples:
            if "input_ids" in example:  # already tokenized by the user: as TRL takes it
                ready.append(example)
                continue
            key = json.dumps([example.get(self.messages_key), example.get(self.prompt_key)], sort_keys=True, default=str)
            done = table.get(key)
            if done is None:
                one = super().__call__([example])
                done = table[key] = Tokenized(one["input_ids"][0].numpy().copy(), int(one["prompts"].shape[1]),
                                              one["byte_offsets"][0].numpy().copy())
            n = len(done.ids)
            ready.append({
                "input_ids": done.ids.tolist(),
                "attention_mask": [1] * n,
                "completion_mask": [0] * done.prompt + [1] * (n - done.prompt),
                "byte_offsets": done.offsets,
                self.prompt_key: "",  # given, so the collator does not template it again (unused with the mask)
                **{k: example[k] for k in PASSED_ON if k in example},
            })
        return super().__call__(ready)
