"""What ``qcompare validate`` can tell without loading a model: each quantizer against each model's
layout, and each evaluator's settings (``Evaluator.check``: lm-eval task names, say).

The layout is read from a model's config, without loading its weights.

Each model's ``config.json`` (a registered model, a local folder, or a hub id whose config is
in the local Hugging Face cache) is built on the meta device — every module and shape, no
memory, no weights — and each quantizer choice of the recipe checks it: whether enough of the
body is of a kind a quantizer reaches for the choice's ``min_coverage`` (``checks.coverage_in_reach``),
then ``Quantizer.check_model``: layouts it cannot handle, group sizes that do not divide a layer,
AWQ families without layer mappings. The answer depends only on the config and the
quantizer's settings and version, so it is kept in a small cache (``$QCOMPARE_CACHE`` or
``~/.cache/qcompare``): validating again imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qcompare.engine.inputs import resolve_model
from qcompare.sdk.cache import read_cache, write_cache
from qcompare.errors import QcompareError
from qcompare.sdk.registry import Registry
from qcompare.sdk.memo import memo_dict

VERSION = 2  # of the cache's entries


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


_hub: dict[str, str] = memo_dict()  # what asking the Hub said, once per process ("" while it answers)


def hub_problem(name: str) -> str | None:
    """Why ``name`` (neither a folder here nor a registered model) cannot be loaded, when the Hugging Face Hub
    says so; None when it is a model there, or when the Hub cannot be asked (``hub_note`` says which)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        _hub["state"] = "offline (HF_HUB_OFFLINE is set), so the model id is not checked"
        return None
    if _hub.get("state"):
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return f"{name!r} is not a folder here (and not a Hub model id: owner/name)"
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        return None
    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        return None  # it exists; loading it needs access (`hf auth login`)
    except RepositoryNotFoundError:
        return (f"{name!r} is neither a folder here, a registered model, nor a model on the Hugging Face Hub "
                "(a private one needs `hf auth login`)")
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a timeout: the Hub cannot be asked
        _hub["state"] = f"the Hugging Face Hub is not reachable ({type(e).__name__}), so the model id is not checked"
    return None


def hub_note() -> str:
    return f"; {_hub['state']}" if _hub.get("state") else ""


def _key(config: dict, choice, identity: dict) -> str:
    blob = json.dumps([VERSION, config, choice.name, choice.params, choice.min_coverage, identity], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def problems(recipe, registry: Registry) -> tuple[list[str], list[str]]:
    """(problems, notes): one line per model × quantizer that cannot work, and one per model whose
    config is not available here (not checked)."""
    from qcompare.engine.provenance import plugin_identity

    cache = read_cache()
    found, notes, fresh = [], [], False
    for model_name in recipe.models:
        config = model_config(model_name, registry)
        if config is None:
            missing = hub_problem(model_name)
            if missing is not None:
                found.append(f"{recipe.source}: models: {missing}")
            else:
                notes.append(f"{model_name}: no config.json here (not downloaded yet); its layout is checked when it "
                             f"runs{hub_note()}")
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
    for i, choice in enumerate(recipe.evaluators):  # a task that does not exist fails every cell after training
        cls = registry.get("evaluator", choice.name)
        try:
            cls().check(cls.Params.model_validate(choice.params), list(registry.task_folders))
        except QcompareError as e:
            found.append(f"{recipe.source}: evaluators[{i}]: {e}")
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
    from qcompare.compat_scope import meta_model

    try:
        return meta_model(config)
    except Exception as e:  # noqa: BLE001 - an unknown architecture shows when the model loads
        raise QcompareError(f"{name}: cannot build the model from its config.json ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0]})") from None


def _check(cls, choice, model) -> str:
    """'' if the quantizer takes the model, else its one-line reason (``checks.takes_layout``)."""
    from qcompare.sdk import checks

    minimum = checks.DEFAULT_MIN_COVERAGE if choice.min_coverage is None else choice.min_coverage
    try:
        checks.takes_layout(model, cls(), cls.Params.model_validate(choice.params), minimum)
    except QcompareError as e:
        return str(e)
    return ""
