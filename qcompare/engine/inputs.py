"""Models and training data named by a recipe: registered short names, local paths, or hub ids."""

from __future__ import annotations

from pathlib import Path

from qcompare.errors import QcompareError
from qcompare.sdk.registry import Registry


def resolve_model(name: str, registry: Registry) -> str:
    """A registered model name becomes its folder; anything else goes to ``from_pretrained`` as is."""
    if name in registry.models:
        return str(registry.models[name].obj[0])
    return name


def load_model(name: str, registry: Registry, device: str):
    """Load a causal LM and its tokenizer the way a hub model is loaded; float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qcompare.sdk.saving import load_pretrained, read_format

    hf_logging.disable_progress_bar()  # qcompare draws its own progress

    where = resolve_model(name, registry)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        if read_format(where) is not None:  # a folder qcompare saved in a quantizer plugin's own format
            model = load_pretrained(where)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        raise QcompareError(
            f"cannot load model {name!r} ({str(e).splitlines()[0]}); give a local folder, a registered name "
            f"({', '.join(registry.models) or 'none'}) or a hub id reachable from this machine"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_training_data(spec, registry: Registry):
    """The recipe's ``[data]`` as a Dataset with a ``messages`` column (shuffled, subset)."""
    import datasets

    if spec.train is None:
        return None
    source = spec.train
    if source in registry.datasets:
        source = str(registry.datasets[source].obj[0])
    path = Path(source)
    try:
        if path.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split=spec.split)
    except FileNotFoundError:
        raise QcompareError(f"data.train: file not found: {source}") from None
    except Exception as e:  # datasets raises many types for an unreachable hub id
        raise QcompareError(
            f"data.train: cannot load {spec.train!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "give a local .jsonl/.parquet file with a messages column, or a hub id reachable from here"
        ) from None
    if "messages" not in ds.column_names:
        raise QcompareError(
            f"data.train: {spec.train!r} has no 'messages' column (found: {', '.join(ds.column_names)}); "
            "rows must hold chat messages as [{role, content}, ...]"
        )
    ds = ds.shuffle(seed=spec.shuffle_seed)
    if spec.subset is not None:
        ds = ds.select(range(min(spec.subset, len(ds))))
    return ds
