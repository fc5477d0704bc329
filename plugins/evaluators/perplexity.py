"""The ``perplexity`` evaluator: sliding-window token perplexity on held-out documents.

Computed here rather than through lm-eval's ``loglikelihood_rolling`` (its wikitext task):
lm-eval's rolling windows are disjoint (each sees one token of the window before), so a
``stride`` as in Hugging Face's perplexity guide can't be set; it reports word and byte
perplexity of a task YAML rather than token perplexity of any dataset; and it prints a
tqdm bar per batch. The loop below is the guide's, scored exactly once per token.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field, model_validator

from qcompare.sdk import EvalResult, Evaluator, Items, Params, QcompareError
from qcompare_plugins.evaluators.heldout import (dataset_label, doc_id, load_documents, ratio_stderr, token_ids,
                                                 window_length)


class PerplexityParams(Params):
    dataset: str = Field(description="registered dataset name, local .jsonl/.txt file, or hub id (wikitext)")
    max_samples: Annotated[int, Field(ge=1)] | None = Field(None, description="the first N documents, in the file's order (default: all)")
    max_length: Annotated[int, Field(ge=2)] | None = Field(None, description="window in tokens (default: the model's, at most 2048)")
    stride: Annotated[int, Field(ge=1)] | None = Field(None, description="tokens the window moves (default: half the window)")
    split: str = "test"

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride and self.max_length and self.stride > self.max_length:
            raise ValueError(f"stride {self.stride} is longer than max_length {self.max_length}; tokens would go unscored")
        return self


class PerplexityEvaluator(Evaluator):
    """Sliding-window token perplexity on held-out text (per-document NLL items)."""

    name = "perplexity"
    Params = PerplexityParams

    def evaluate(self, model, params, context):
        import torch

        tokenizer = context.tokenizer

        label = dataset_label(params.dataset)
        texts = load_documents(params.dataset, tokenizer, params.max_samples, params.split)
        named = [(doc_id(i, t), ids) for i, (t, ids) in enumerate(zip(texts, token_ids(tokenizer, texts)))
                 if len(ids) >= 2]  # the first token is never predicted
        docs = [ids for _, ids in named]
        if not docs:
            raise QcompareError(f"perplexity: every document of {params.dataset!r} is shorter than 2 tokens")
        window = window_length(model, params.max_length)
        stride = min(params.stride or max(window // 2, 1), window)
        model.eval()
        sums, counts = [], []
        with context.progress.task(f"perplexity: {label}", total=len(docs)) as advance, torch.inference_mode():
            for ids in docs:
                nll, n = document_nll(model, ids, window, stride)
                sums.append(nll)
                counts.append(n)
                advance(1)
        nll = sum(sums) / sum(counts)
        se = ratio_stderr(sums, counts)
        return EvalResult(
            metrics={f"{label}/ppl": math.exp(nll), f"{label}/nll": nll},
            stderr={f"{label}/ppl": math.exp(nll) * se, f"{label}/nll": se},
            items={label: Items([name for name, _ in named], {"nll": [s / n for s, n in zip(sums, counts)]},
                                [float(n) for n in counts])},
        )


def document_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens 1..n-1 and their count.

    Windows of ``window`` tokens start every ``stride`` tokens; each scores only the
    tokens no earlier window scored, so each token is counted once with up to
    ``window - stride`` tokens of context carried over.
    """
    import torch
    import torch.nn.functional as F

    device = model.device
    total, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        inputs = torch.tensor([ids[begin:end]], device=device)
        logits = model(inputs).logits[0, :-1].float()  # fp32: bf16 log-softmax loses digits
        token_nll = F.cross_entropy(logits, inputs[0, 1:], reduction="none")
        # Position j predicts token begin + 1 + j. With stride == window the window's first
        # token has no context inside it and stays unscored, as in the HF guide.
        new = token_nll[max(scored_until - begin - 1, 0) :]
        total += new.sum().item()
        count += new.numel()
        scored_until = end
        if end == len(ids):
            break
    return total, count
