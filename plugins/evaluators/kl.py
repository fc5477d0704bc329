"""The ``kl_to_teacher`` evaluator: how far the student's next-token distributions drift.

KL(teacher || student) is the forward KL that off-policy distillation minimises, so it
measures directly what recovery training tries to undo; top-1 agreement says how often
greedy decoding would pick the same token.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qcompare.sdk import EvalResult, Evaluator, Items, Params, QcompareError
from qcompare_plugins.evaluators.heldout import (dataset_label, doc_id, load_documents, ratio_stderr, token_ids,
                                                 window_length)


class KLParams(Params):
    dataset: str = Field(description="registered dataset name, local .jsonl/.txt file, or hub id (wikitext)")
    max_samples: Annotated[int, Field(ge=1)] | None = Field(None, description="the first N documents, in the file's order (default: all)")
    max_length: Annotated[int, Field(ge=1)] | None = Field(None, description="tokens kept of each document (default: the model's, at most 2048)")
    split: str = "test"


class KLToTeacherEvaluator(Evaluator):
    """Mean per-token KL(teacher || student) and top-1 agreement on held-out text."""

    name = "kl_to_teacher"
    Params = KLParams

    def evaluate(self, model, params, context):
        import torch

        tokenizer = context.tokenizer

        teacher = context.teacher
        if teacher is None:
            raise QcompareError("kl_to_teacher: the cell has no teacher model to compare with; drop this evaluator or give a teacher")
        task = f"{dataset_label(params.dataset)}-vs-teacher"
        window = window_length(model, params.max_length)
        texts = load_documents(params.dataset, tokenizer, params.max_samples, params.split)
        docs = [(doc_id(i, text), ids[:window]) for i, (text, ids) in enumerate(zip(texts, token_ids(tokenizer, texts)))]
        docs = [(name, ids) for name, ids in docs if ids]
        kl_sums, agrees, counts = [], [], []
        model.eval()
        teacher.eval()
        with context.progress.task(f"kl_to_teacher: {task}", total=len(docs)) as advance, torch.inference_mode():
            for _, ids in docs:
                if model is teacher:  # the baseline row: zero by definition, no second pass
                    kl, same = torch.zeros(len(ids)), len(ids)
                else:
                    kl, same = token_kl(teacher, model, ids)
                kl_sums.append(kl.sum().item())
                agrees.append(float(same))
                counts.append(len(ids))
                advance(1)
        tokens = sum(counts)
        # both metrics are per-token means over documents of different lengths: ratio estimators,
        # with documents as the sampling unit (their stderr and the item weights say so)
        return EvalResult(
            metrics={f"{task}/kl": sum(kl_sums) / tokens, f"{task}/top1_agree": sum(agrees) / tokens},
            stderr={f"{task}/kl": ratio_stderr(kl_sums, counts), f"{task}/top1_agree": ratio_stderr(agrees, counts)},
            items={task: Items([name for name, _ in docs], {"kl": [k / n for k, n in zip(kl_sums, counts)],
                                                             "top1_agree": [a / n for a, n in zip(agrees, counts)]},
                               [float(n) for n in counts])},
        )


def token_kl(teacher, student, ids: list[int]) -> tuple:
    """Per-position KL(teacher || student) in fp32 and how many argmaxes agree."""
    import torch
    import torch.nn.functional as F

    t_logits = teacher(torch.tensor([ids], device=teacher.device)).logits[0].float()
    s_logits = student(torch.tensor([ids], device=student.device)).logits[0].float().to(t_logits.device)
    vocab = min(t_logits.shape[-1], s_logits.shape[-1])  # a padded vocabulary adds rows no token uses
    t_logp = F.log_softmax(t_logits[:, :vocab], dim=-1)
    s_logp = F.log_softmax(s_logits[:, :vocab], dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).clamp_min(0.0)
    same = int((t_logp.argmax(-1) == s_logp.argmax(-1)).sum())
    return kl.cpu(), same
