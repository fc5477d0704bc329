"""What ``qcompare validate`` can tell from a model's config without loading its weights.

Each model's ``config.json`` (a registered model, a local folder, or a hub id whose config is
in the local Hugging Face cache) is built on the meta device — every module and shape, no
memory, no weights — and each quantizer choice of the recipe checks it with
``Quantizer.check_model``: layouts it cannot handle, group sizes that do not divide a layer,
AWQ families without layer mappings. The answer depends only on the config and the
quantizer's settings and version, so it is kept in a small cache (``$QCOMPARE_CACHE`` or
``~/.cache/qcompare``): validating again imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qcompare.data import resolve_model
from qcompare.cache import read_cache, write_cache
from qcompare.errors import QcompareError
from qcompare.plugins import Registry

VERSION = 1  # of the cache's entries


def model_config(name: str, registry: Registry) -> dict | None:
    """The model's config.json as a dict, from disk or the local hub cache; None if not here."""
    where = Path(resolve_model(name, registry)).expanduser()
    if (where / "config.json").is_file():
        return json.loads((where / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(str(name), "config.json")
    except Exception:  # not a repo id, or no cache at all
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _key(config: dict, choice, identity: dict) -> str:
    blob = json.dumps([VERSION, config, choice.name, choice.params, identity], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def problems(recipe, registry: Registry) -> tuple[list[str], list[str]]:
    """(problems, notes): one line per model × quantizer that cannot work, and one per model whose
    config is not available here (not checked)."""
    from qcompare.provenance import plugin_identity

    cache = read_cache()
    found, notes, fresh = [], [], False
    for model_name in recipe.models:
        config = model_config(model_name, registry)
        if config is None:
            notes.append(f"{model_name}: no config.json here (not downloaded yet); its layout is checked when it runs")
            continue
        built = None
        for choice in recipe.quantizers:
            entry = registry.plugins["quantizer"][choice.name]
            key = _key(config, choice, plugin_identity(entry))
            if key not in cache:
                if built is None:
                    built = _meta_model(config, model_name)
                cache[key] = _check(entry.obj, choice, built)
                fresh = True
            if cache[key]:
                found.append(f"{recipe.source}: quantizer {choice.label()} on {model_name}: {cache[key]}")
    if fresh:
        write_cache(cache)
    return list(dict.fromkeys(found)), notes


def parameter_count_from_config(config: dict, name: str) -> int:
    """The parameters of the model ``config`` describes (built on the meta device once, then cached)."""
    key = "parameters:" + hashlib.sha256(json.dumps([VERSION, config], sort_keys=True).encode()).hexdigest()[:24]
    cache = read_cache()
    if key not in cache:
        model = _meta_model(config, name)
        cache[key] = sum(p.numel() for p in model.parameters())
        write_cache(cache)
    return cache[key]


def _meta_model(config: dict, name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    cfg.pop("quantization_config", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - an unknown architecture shows when the model loads
        raise QcompareError(f"{name}: cannot build the model from its config.json ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0]})") from None


def _check(cls, choice, model) -> str:
    """'' if the quantizer takes the model, else its one-line reason."""
    import copy

    try:
        cls().check_model(copy.deepcopy(model), cls.Params.model_validate(choice.params))
    except QcompareError as e:
        return str(e)
    return ""
