"""A price before the run: each cell's FLOPs, wall time and GPU-hours, estimated from what it will
compute, and checked afterwards against what it took.

FLOPs come from the model's parameter count and the tokens the distiller plans
(``Distiller.planned_tokens``: upper bounds, every sequence at its maximum length), with the same
formula the distillers use to report what they computed (``logical_flops``). Time comes from rates:
measured in the run folder's finished cells of the same model and device (training FLOPs per
second, generated tokens per second, and the seconds a cell spends outside training: loading,
quantizing, evaluating) or, where none has finished, a stated default for the device. The runner
keeps each cell's estimate in its record; ``qcompare report`` sets it against the actual cost.
Each estimate also holds the cell's expected peak memory on the device (``qcompare.engine.memory``).
"""

from __future__ import annotations

import json
import os
import statistics
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompare.sdk.cost import logical_flops

# Assumed when no finished cell of the model and device measures them (labelled "assumed"):
# sustained FLOP/s of training steps, and of decoding (2·N per generated token; batched decoding
# is bound by memory, not arithmetic, so it runs at a fraction of the training rate).
DEFAULT_RATES = {
    "cpu": (2e10, 2e9),  # two cores, float32, a model of a few hundred million parameters
    "cuda": (1.2e14, 1.2e13),  # ~40% of an A100's bf16 peak; decoding at a tenth of it
}


# --- parameter counts, without loading a model ------------------------------------------------


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def parameter_count(model: str, registry) -> int | None:
    """The model's parameters, from its safetensors headers (a local or registered folder), else
    from its config on the meta device (cached with qcompare validate's checks); None if unknown."""
    from qcompare.engine.inputs import resolve_model

    folder = Path(resolve_model(model, registry)).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        return sum(_safetensors_numel(f) for f in files)
    from qcompare.engine.structure import model_config, parameter_count_from_config

    config = model_config(model, registry)
    return parameter_count_from_config(config, model) if config is not None else None


def model_facts(model: str, registry):
    """The model's sizes (``qcompare.sdk.api.ModelFacts``) from its files, or None where unknown here."""
    from qcompare.sdk.api import ModelFacts
    from qcompare.engine.structure import model_config

    n = parameter_count(model, registry)
    if n is None:
        return None
    config = model_config(model, registry) or {}
    text = config.get("text_config") or config
    return ModelFacts(n, text.get("vocab_size"), text.get("hidden_size"),
                      bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))


def batch_peers(cells, registry) -> dict[str, int]:
    """For each cell id, how many cells of ``cells`` (itself included) train on the same batches:
    same model, data, seed, distiller and ``Distiller.batch_key``."""
    keys = {}
    for cell in cells:
        if cell.distiller is None:
            continue
        cls = registry.get("distiller", cell.distiller.name)
        key = cls().batch_key(cls.Params.model_validate(cell.distiller.params))
        if key is not None:
            keys[cell.id] = (cell.model, cell.shared[0], cell.seed, cell.distiller.name, key)
    counts: dict = {}
    for key in keys.values():
        counts[key] = counts.get(key, 0) + 1
    return {cid: counts[key] for cid, key in keys.items()}


def plan_notes(cells, registry) -> list[str]:
    """What each distiller says about how its cells will run (``Distiller.plan_note``), once per
    distinct line, prefixed by the model."""
    peers = batch_peers(cells, registry)
    facts, notes = {}, []
    for cell in cells:
        if cell.distiller is None:
            continue
        if cell.model not in facts:
            facts[cell.model] = model_facts(cell.model, registry)
        cls = registry.get("distiller", cell.distiller.name)
        note = cls().plan_note(cls.Params.model_validate(cell.distiller.params), facts[cell.model],
                               peers.get(cell.id, 1))
        if note:
            notes.append(f"{cell.model}: {note}")
    return list(dict.fromkeys(notes))


# --- rates -------------------------------------------------------------------------------------


@dataclass
class Rates:
    train_flops_per_second: float
    decode_flops_per_second: float  # 2·N per generated token
    overhead_seconds: float | None  # a cell's seconds outside training (load, quantize, evaluate)
    fill: float  # tokens a cell computed / the tokens its parameters allow (sequences shorter than max_length)
    decode_fill: float  # tokens generated / max_new_tokens allowed (rollouts that stop early)
    basis: str


def _planned(record, registry) -> dict | None:
    d = record.settings.distiller
    if d is None or d.name not in registry.plugins["distiller"]:
        return None
    cls = registry.get("distiller", d.name)
    try:
        return cls().planned_tokens(cls.Params.model_validate(d.params))
    except Exception:  # noqa: BLE001 - a record of other plugin versions: no calibration from it
        return None


def measured_rates(records, model: str, device: str, registry) -> Rates:
    """Rates from the finished cells of ``model`` on ``device``; the device's defaults where none."""
    mine = [r for r in records if r.done and r.settings.model == model and (r.cost or {}).get("device") == device]
    flops = seconds = decode = rollout = 0.0
    overhead, fill, decode_fill, trained = [], [], [], 0
    for r in mine:
        c = r.cost
        n = c.get("student_params", 0)
        compute = logical_flops(n, c.get("teacher_params", 0),
                                {"student_tokens": c.get("student_tokens"), "teacher_tokens": c.get("teacher_tokens")})
        busy = (c.get("train_seconds") or 0) - (c.get("rollout_seconds") or 0)
        if compute and busy > 0:
            flops, seconds, trained = flops + compute, seconds + busy, trained + 1
        if c.get("tokens_generated") and c.get("rollout_seconds"):
            decode, rollout = decode + 2 * n * c["tokens_generated"], rollout + c["rollout_seconds"]
        if c.get("total_seconds") is not None and not r.is_teacher:
            overhead.append(c["total_seconds"] - (c.get("train_seconds") or 0))
        planned = _planned(r, registry) or {}
        if planned.get("student_tokens") and c.get("student_tokens"):
            fill.append(c["student_tokens"] / planned["student_tokens"])
        if planned.get("generated_tokens") and c.get("tokens_generated") is not None:
            decode_fill.append(c["tokens_generated"] / planned["generated_tokens"])
    default_train, default_decode = DEFAULT_RATES.get(device, DEFAULT_RATES["cpu"])
    parts = [f"training rate from {trained} cells"] if seconds else []
    parts += ["decoding rate measured"] if rollout else []
    parts += [f"sequences fill {statistics.median(fill):.0%} of max_length"] if fill else []
    basis = (f"measured in this run folder ({', '.join(parts)})" if parts else
             f"assumed for {device}: {default_train:.0e} FLOP/s training, {default_decode:.0e} decoding")
    return Rates(flops / seconds if seconds else default_train, decode / rollout if rollout else default_decode,
                 statistics.median(overhead) if overhead else None, statistics.median(fill) if fill else 1.0,
                 statistics.median(decode_fill) if decode_fill else 1.0, basis)


# --- estimates ---------------------------------------------------------------------------------


@dataclass
class Estimate:
    flops: float | None
    seconds: float | None
    device: str
    basis: str
    tokens: dict = field(default_factory=dict)
    memory: Any = None  # qcompare.engine.memory.Memory, or None where the model's config is not here
    memory_inputs: dict = field(default_factory=dict)  # what qcompare.engine.memory.fixes needs besides the capacity

    def as_record(self) -> dict:
        record = {"flops": self.flops, "seconds": self.seconds, "device": self.device, "basis": self.basis}
        return record | ({"memory": self.memory.as_record()} if self.memory is not None else {})


def guess_device(recipe) -> str:
    """The recipe's device; for "auto", whether an NVIDIA driver is present (no torch import)."""
    if recipe.device != "auto":
        return recipe.device
    return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"


def cell_memory_inputs(cell, shapes, registry) -> dict:
    """The arguments of ``qcompare.engine.memory.cell_memory`` (and ``fixes``) for ``cell`` of a model of ``shapes``."""
    if cell.distiller is None or cell.quantizer is None:  # the teacher's row: its weights only
        return {"m": shapes, "params": None, "shares_weights": True}
    dcls, qcls = registry.get("distiller", cell.distiller.name), registry.get("quantizer", cell.quantizer.name)
    dparams, distiller = dcls.Params.model_validate(cell.distiller.params), dcls()
    lora = dparams.model_copy(update={"lora_r": 16}) if hasattr(dparams, "lora_r") else dparams
    return {"m": shapes, "params": dparams,
            "shares_weights": qcls.shares_teacher_weights and distiller.keeps_base_weights(dparams),
            "lora_shares": qcls.shares_teacher_weights and distiller.keeps_base_weights(lora)}


def estimate_cells(recipe, store, cells, registry, device: str | None = None) -> dict[str, Estimate]:
    """An estimate per cell id (training cells, PTQ cells and the teacher's evaluation alike)."""
    from qcompare.engine.memory import Shapes, cell_memory
    from qcompare.engine.structure import model_config

    device = device or guess_device(recipe)
    records = list(store.records()) if store.root.is_dir() else []
    params, rates, shapes, out = {}, {}, {}, {}
    for cell in cells:
        if cell.model not in params:
            params[cell.model] = parameter_count(cell.model, registry)
            rates[cell.model] = measured_rates(records, cell.model, device, registry)
            config = model_config(cell.model, registry) if params[cell.model] is not None else None
            shapes[cell.model] = Shapes.from_config(config, params[cell.model]) if config else None
        n, rate = params[cell.model], rates[cell.model]
        inputs = cell_memory_inputs(cell, shapes[cell.model], registry) if shapes[cell.model] else {}
        memory = cell_memory(**{k: v for k, v in inputs.items() if k != "lora_shares"}, device=device) if inputs else None
        tokens: dict | None = {}
        if cell.distiller is not None:
            cls = registry.get("distiller", cell.distiller.name)
            tokens = cls().planned_tokens(cls.Params.model_validate(cell.distiller.params))
        if tokens is None or n is None:
            why = "the distiller gives no estimate" if tokens is None else "parameter count unknown (config not here)"
            out[cell.id] = Estimate(None, None, device, why, memory=memory, memory_inputs=inputs)
            continue
        # the tokens the cell is expected to compute: its bound, at the fill measured here
        expected = {k: v * (rate.decode_fill if k == "generated_tokens" else rate.fill) for k, v in tokens.items()}
        train = logical_flops(n, n, {k: expected.get(k) for k in ("student_tokens", "teacher_tokens")})
        seconds = train / rate.train_flops_per_second
        seconds += 2 * n * expected.get("generated_tokens", 0) / rate.decode_flops_per_second
        basis = rate.basis
        if rate.overhead_seconds is not None:
            seconds += rate.overhead_seconds
        else:
            basis += "; loading, quantizing and evaluating not included (no cell has finished here)"
        out[cell.id] = Estimate(logical_flops(n, n, expected), seconds, device, basis, expected, memory, inputs)
    return out


def against_actual(records) -> dict | None:
    """How the estimates the runner stored compare with what the cells took: the median and range
    of actual / estimate for FLOPs and for seconds, over the cells that have both."""
    flops, seconds = [], []
    for r in records:
        est = (r.estimate or {}) if r.done else {}
        cost = r.cost or {}
        if est.get("flops") and cost.get("flops"):
            flops.append(cost["flops"] / est["flops"])
        if est.get("seconds") and cost.get("total_seconds"):
            seconds.append(cost["total_seconds"] / est["seconds"])
    if not flops and not seconds:
        return None
    summary = lambda xs: (statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None  # noqa: E731
    return {"flops": summary(flops), "seconds": summary(seconds)}
