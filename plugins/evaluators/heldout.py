"""Held-out text for the perplexity and KL evaluators: one list of documents, fixed order.

A ``dataset`` is, in this order: a dataset name registered by a plugin, a local file
(.jsonl/.json with a ``text`` or ``messages`` column, .parquet, or .txt split on blank
lines), or a Hugging Face hub id loaded with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
from pathlib import Path

from qcompare.sdk import QcompareError

# Hub ids users write for the usual held-out text, mapped to the document-level copy
# lm-eval's own wikitext task reads (one row per article, so items are documents).
HUB_ALIASES = {
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
    "wikitext-2-raw-v1": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
    "wikitext-103-raw-v1": ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "test"),
}
TEXT_COLUMNS = ("text", "page", "content", "messages")
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
OFFLINE_HINT = "offline, give a registered dataset name or a local .jsonl (a 'text' column) or .txt file"


def dataset_label(dataset: str) -> str:
    """Short name used as the task part of ``task/metric`` keys."""
    if dataset in HUB_ALIASES:
        return "wikitext"
    if Path(dataset).suffix in LOCAL_SUFFIXES:
        return Path(dataset).stem
    return dataset.rstrip("/").split("/")[-1]


def load_documents(dataset: str, tokenizer, max_samples: int | None = None, split: str = "test") -> list[str]:
    """The documents of ``dataset`` as strings, in file order, at most ``max_samples``."""
    from qcompare.sdk import get_registry

    registered = get_registry().datasets
    if dataset in registered:
        path, _ = registered[dataset].obj
        docs = _read_local(Path(path), tokenizer)
    elif Path(dataset).exists():
        docs = _read_local(Path(dataset), tokenizer)
    elif Path(dataset).suffix in LOCAL_SUFFIXES:
        raise QcompareError(f"dataset {dataset!r}: no such file; registered datasets: {', '.join(sorted(registered)) or '(none)'}")
    else:
        docs = _read_hub(dataset, tokenizer, split, sorted(registered))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QcompareError(f"dataset {dataset!r} holds no text; give rows with a 'text' column")
    return docs[:max_samples] if max_samples else docs


def _read_local(path: Path, tokenizer) -> list[str]:
    if path.suffix == ".txt":
        return [p.strip() for p in path.read_text().split("\n\n")]
    if path.suffix == ".parquet":
        import datasets

        return _rows_to_text(list(datasets.Dataset.from_parquet(str(path))), str(path), tokenizer)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _rows_to_text(rows, str(path), tokenizer)


def _read_hub(dataset: str, tokenizer, split: str, registered: list[str]) -> list[str]:
    import datasets

    path, name, split = HUB_ALIASES.get(dataset, (dataset, None, split))
    try:
        rows = list(datasets.load_dataset(path, name, split=split))
    except (OSError, ValueError) as e:  # ConnectionError under HF_HUB_OFFLINE=1, DatasetNotFoundError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        known = f" ({', '.join(registered)})" if registered else ""
        raise QcompareError(f"dataset {dataset!r} can't be loaded from the hub: {reason}; {OFFLINE_HINT}{known}") from None
    return _rows_to_text(rows, dataset, tokenizer)


def _rows_to_text(rows: list[dict], where: str, tokenizer) -> list[str]:
    if not rows:
        return []
    column = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    if column is None:
        raise QcompareError(f"dataset {where!r} has columns {sorted(rows[0])}; give one of {', '.join(TEXT_COLUMNS)}")
    if column != "messages":
        return [str(r[column]) for r in rows]
    # Chat data: score the conversation as the model sees it when it has a template.
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return ["\n".join(m["content"] for m in r["messages"]) for r in rows]


def window_length(model, max_length: int | None) -> int:
    """The longest sequence one forward pass sees: ``max_length``, capped by the model."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return min(max_length or 2048, limit)


def token_ids(tokenizer, docs: list[str]) -> list[list[int]]:
    return [tokenizer(d, add_special_tokens=True)["input_ids"] for d in docs]


def doc_id(index: int, text: str) -> str:
    """A document's stable item id: its position and a hash of its text."""
    import hashlib

    return f"{index}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def ratio_stderr(sums: list[float], counts: list[float]) -> float:
    """Standard error of sum(sums)/sum(counts) with documents as the sampling unit (the
    linearised ratio estimator): per-token means over documents of different lengths."""
    import math

    k = len(sums)
    if k < 2:
        return float("nan")
    ratio = sum(sums) / sum(counts)
    mean_n = sum(counts) / k
    resid = sum((s - ratio * n) ** 2 for s, n in zip(sums, counts))
    return math.sqrt(resid / (k * (k - 1))) / mean_n
