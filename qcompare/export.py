"""A finished cell as a Hugging Face model folder: weights, tokenizer and a model card.

The weights come from the cell's saved ``model/`` folder (recipe option ``save_models``) or,
when the run did not keep them, from re-running the cell's pipeline with the Runner (same
seed, same settings), so an exported model is always the one that was evaluated.

A LoRA cell's model is the quantized base with float adapters beside its layers (merging
them would re-quantize W + BA, a different function). ``save_converted`` is the one place
that saves such a model: the quantizer writes the base as for any cell, and the adapter goes
beside it as a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), which
``AutoModelForCausalLM.from_pretrained(folder)`` loads together with the base.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from qcompare.errors import QcompareError
from qcompare.store import RunStore, open_run

# The part of a metric name after "/" for which lower is better (everything else: higher).
LOWER_IS_BETTER = ("kl", "ppl", "nll", "loss", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def find_cell(store: RunStore, prefix: str) -> dict:
    """The stored record of the finished, quantized cell whose id starts with ``prefix``."""
    ids = sorted(p.name for p in (store.root / "cells").iterdir() if p.name.startswith(prefix))
    if not ids:
        raise QcompareError(f"no cell id in {store.root} starts with {prefix!r}; `qcompare plan` or the report lists them")
    if len(ids) > 1:
        raise QcompareError(f"cell prefix {prefix!r} matches {len(ids)} cells ({', '.join(ids)}); give more characters")
    record = store.result(ids[0])
    if record is None or record.get("status") != "done":
        status = record.get("status") if record else "no result"
        raise QcompareError(f"cell {ids[0]} did not finish ({status}); only finished cells can be exported")
    if record["settings"]["quantizer"] is None:
        raise QcompareError(f"cell {ids[0]} is the teacher baseline (the unquantized model); export a quantized cell")
    return record


def best_cell(root: Path, metric: str) -> dict:
    """The best finished non-teacher cell by ``metric``: the configuration with the best mean over
    seeds, then its best seed."""
    from qcompare.results import group_columns, load_run, metric_column

    df = load_run(root)
    df = df[df["quantizer"] != "teacher"] if not df.empty else df
    if df.empty:
        raise QcompareError(f"export_best: no finished quantized cell in {root}")
    metric_column(df, metric, "export_best metric")
    lower = metric.rpartition("/")[2] in LOWER_IS_BETTER
    keys = group_columns(df)
    means = df.groupby(keys, dropna=False, sort=False)[metric].mean()
    best_key = means.idxmin() if lower else means.idxmax()
    best_key = best_key if isinstance(best_key, tuple) else (best_key,)
    group = df
    for k, v in zip(keys, best_key):
        group = group[group[k].isna()] if v != v else group[group[k] == v]  # v != v: NaN (a param absent here)
    row = group.loc[group[metric].idxmin() if lower else group[metric].idxmax()]
    return open_run(root).result(row["id"])


def export_cell(run_dir: Path, cell: str, to: Path, overwrite: bool = False,
                say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Write cell ``cell`` (an id or unique prefix) of ``run_dir`` to ``to``; return ``to``."""
    store = open_run(run_dir)
    record = find_cell(store, cell)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())) and not overwrite:
        raise QcompareError(f"{to} exists and is not empty; give a new folder (or --force to replace it)")
    saved = store.cell_dir(record["id"]) / "model"
    to.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target, replacing it only once complete: a failed or interrupted export
    # leaves no half model, and an earlier export it was to replace stays as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an exported model is meant to be shared
    try:
        try:
            if (saved / "config.json").is_file():
                shutil.copytree(saved, staging, dirs_exist_ok=True)
                rebuilt = False
            else:
                seed = record["settings"]["seed"]
                say(f"the model of cell {record['id']} was not saved during the run (save_models = false); "
                    f"rebuilding it: prepare → distill → convert{'' if seed is None else f' with seed {seed}'}")
                rebuild(store, record, staging, say)
                rebuilt = True
            (staging / "README.md").write_text(model_card(store, record, staging, rebuilt))
        except QcompareError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            kept = f"; {to} was left as it was" if to.exists() else ""
            raise QcompareError(f"exporting cell {record['id']} failed ({type(e).__name__}: {first}){kept}") from e
        replace_folder(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


def replace_folder(new: Path, to: Path) -> None:
    """Put the finished folder ``new`` at ``to``: any earlier ``to`` is moved aside first and
    deleted only after ``new`` is in place (put back if that move fails)."""
    if to.is_dir() and not any(to.iterdir()):
        to.rmdir()
    if not to.exists():
        new.rename(to)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{to.name}.old.", dir=to.parent)) / to.name
    to.rename(old)
    try:
        new.rename(to)
    except BaseException:
        old.rename(to)
        raise
    shutil.rmtree(old.parent)  # the earlier export (a folder or a file) and the folder holding it


def export_best(run_dir: Path, metric: str, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Export the best cell by ``metric`` to ``<run_dir>/best/`` (replacing an earlier export)."""
    record = best_cell(Path(run_dir), metric)
    to = export_cell(run_dir, record["id"], Path(run_dir) / "best", overwrite=True, say=say)
    value = record["metrics"].get(metric)
    say(f"exported the best cell by {metric} ({record['label']}"
        f"{'' if value is None else f', {metric} = {value:.4f}'}) to {to}")
    return to


def rebuild(store: RunStore, record: dict, folder: Path, say: Callable[[str], None]) -> None:
    """Re-run the cell's pipeline with the Runner and save the converted model into ``folder``."""
    from qcompare.cells import Cell, data_identity
    from qcompare.recipe import PluginChoice, validate
    from qcompare.runner import Runner

    s = record["settings"]
    cell = Cell(s["model"], PluginChoice(**s["quantizer"]), PluginChoice(**s["distiller"]), s["seed"],
                (json.dumps(s["data"], sort_keys=True), json.dumps(s["evaluators"], sort_keys=True)))
    if cell.id != record["id"]:
        raise QcompareError(f"cell {record['id']}: its settings.json no longer hashes to its id; cannot rebuild it")
    source = store.root / "recipe.toml"
    # The stored settings, not the recipe file (--set overrides are not in it), decide the cell.
    data = record.get("data_source", s["data"])
    raw = {"name": store.root.name, "models": [s["model"]], "seeds": [s["seed"] or 0], "teacher": False,
           "data": data, "quantizers": [{"name": cell.quantizer.name, **cell.quantizer.params}],
           "distillers": [{"name": cell.distiller.name, **cell.distiller.params}]}
    recipe = validate(raw, source, source.read_text() if source.exists() else "")
    if data_identity(recipe.data) != s["data"]:
        raise QcompareError(f"cell {record['id']}: its training data {data.get('train')!r} is missing or changed since "
                            "the run, so its model cannot be rebuilt; save_models = true keeps models")
    runner = Runner(recipe, store)
    ran_on = record.get("cost", {}).get("device")
    if ran_on and ran_on != runner.device:
        say(f"warning: cell {record['id']} ran on {ran_on} and is rebuilt on {runner.device}; "
            "training numerics may differ slightly (save_models = true keeps the exact model)")
    with tempfile.TemporaryDirectory(prefix="qcompare-rebuild-") as scratch:
        # Checkpoints and trainer logs of the rebuild go to scratch, never into the stored cell.
        ctx = runner.context(cell, Path(scratch), trackers=False)
        runner.save_model(runner.converted_model(cell, ctx), ctx, folder)


# --- LoRA students: the quantized base plus a PEFT adapter ------------------------------

ADAPTER_CONFIG = "adapter_config.json"


def lora_layers(model) -> list[tuple[str, object]]:
    """(name, layer) of the PEFT tuner layers (LoRA) a distiller left in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def without_adapters(model):
    """``model`` with each LoRA layer swapped for its (quantized) base layer inside the block;
    the adapters are put back afterwards, so the evaluated model leaves unchanged."""
    layers = lora_layers(model)
    for name, layer in layers:
        model.set_submodule(name, layer.get_base_layer())
    try:
        yield model
    finally:
        for name, layer in layers:
            model.set_submodule(name, layer)


def save_converted(quantizer, model, params, folder: Path, context) -> None:
    """Save a converted model into ``folder``: the one place that decides how LoRA cells are saved.

    Without adapters this is ``quantizer.save``. With them, ``quantizer.save`` writes the
    quantized base (its layers unwrapped) exactly as for a full fine-tuning cell, and the
    adapter follows as a PEFT adapter in the same folder."""
    if not lora_layers(model):
        quantizer.save(model, params, folder, context)
        return
    with without_adapters(model) as base:
        quantizer.save(base, params, folder, context)
    save_adapter(model, folder)


def save_adapter(model, folder: Path) -> None:
    """Write the LoRA adapter of ``model`` as peft's ``PeftModel.save_pretrained`` does."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(model, "peft_config", None) or {}
    if len(configs) != 1:
        raise QcompareError(f"the student carries {len(configs)} PEFT adapters ({', '.join(configs) or 'no config'}); "
                            "export needs exactly one, as the distillers make")
    [(name, config)] = configs.items()
    state = get_peft_model_state_dict(model, adapter_name=name)
    Path(folder).mkdir(parents=True, exist_ok=True)
    # peft's own key prefix (PeftModel wraps the transformers model as base_model.model)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
              str(Path(folder) / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(config)
    config.inference_mode = True
    # The base is this folder, not the float model the student came from: transformers loads a
    # local folder holding config.json and adapter_config.json as base + adapter and ignores
    # this field; a loader that follows it would put the adapter on the wrong (float) base.
    config.base_model_name_or_path = None
    config.save_pretrained(str(folder))


# --- the model card --------------------------------------------------------------------


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def _params(choice: dict | None) -> str:
    if not choice or not choice.get("params"):
        return "(no parameters)"
    return ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in choice["params"].items())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_index(record: dict, name: str) -> list[dict]:
    """Hugging Face ``model-index``: one result per task, each metric with its stderr beside it."""
    by_task: dict[str, list[dict]] = {}
    stderr = record.get("stderr", {})
    for key, value in record.get("metrics", {}).items():
        task, _, metric = key.partition("/")
        entries = by_task.setdefault(task, [])
        entries.append({"type": metric, "value": float(value), "name": key})
        if key in stderr and stderr[key] is not None:
            entries.append({"type": f"{metric}_stderr", "value": float(stderr[key]), "name": f"{key} stderr"})
    results = [{"task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": task, "type": task}, "metrics": metrics} for task, metrics in by_task.items()]
    return [{"name": name, "results": results}]


def use_lines(folder: Path) -> list[str]:
    """The card's "Use" section: the code that loads this folder to the evaluated model."""
    if not (folder / ADAPTER_CONFIG).is_file():
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    compressed = config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    lines = ["The folder holds the quantized base model (`config.json`, `model.safetensors`) and the LoRA adapter "
             "trained on it (`adapter_config.json`, `adapter_model.safetensors`: float, not merged, since merging "
             "would re-quantize the weights and change the model). transformers loads both at once from the "
             "folder (`peft` must be installed); a loader that ignores the adapter files gets the base alone, "
             "which is not the evaluated model. Before uploading the folder to the Hugging Face Hub, set "
             "`base_model_name_or_path` in `adapter_config.json` to the repository's id: transformers takes the "
             "base of a Hub repository with an adapter from there (a local folder is its own base)."]
    if compressed:
        # peft wraps Linear layers that hold a .weight; compressed-tensors keeps them packed unless asked
        lines[0] += (" The adapter needs the compressed-tensors weights dequantized on load "
                     "(`dequantize=True`: the same values, held in float; transformers warns that it "
                     "overrides that loading attribute of the folder's config).")
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig", "",
                'model = AutoModelForCausalLM.from_pretrained(  # base + LoRA adapter',
                '    "path/to/this/folder", quantization_config=CompressedTensorsConfig(dequantize=True))']
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # base + LoRA adapter']
    return lines + ["", "```python"] + load + ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
                                               "```", ""]


def model_card(store: RunStore, record: dict, folder: Path, rebuilt: bool) -> str:
    s = record["settings"]
    q, d = s["quantizer"], s["distiller"]
    name = f"{Path(s['model']).name}-{q['name']}-{d['name']}-{record['id']}"
    lora = (folder / ADAPTER_CONFIG).is_file()
    meta = {"base_model": s["model"], "library_name": "transformers",
            "tags": ["qcompare", "quantization", q["name"]] + ([d["name"]] if d["name"] != "none" else [])
            + (["lora", "peft"] if lora else []),
            "model-index": model_index(record, name)}
    lines = ["---", _yaml(meta).rstrip(), "---", "", f"# {name}", "",
             f"A quantized **{s['model']}** made and evaluated by qcompare "
             f"(cell `{record['id']}` of the run `{store.root.name}`).", "",
             f"- **Base model:** `{s['model']}`",
             f"- **Quantizer:** `{q['name']}` — {_params(q)}",
             f"- **Distiller:** `{d['name']}` — {_params(d)}",
             f"- **Seed:** {'— (no training: the result does not depend on it)' if s['seed'] is None else s['seed']}"]
    if s.get("data") and s["data"].get("train"):
        lines.append(f"- **Training data:** `{s['data']['train']}` (subset {s['data'].get('subset') or 'all'})")
    lines += ["", "## Evaluation", "", "| metric | value | ± stderr |", "|---|---:|---:|"]
    stderr = record.get("stderr", {})
    for key, value in record.get("metrics", {}).items():
        err = stderr.get(key)
        lines.append(f"| {key} | {value:.4f} | {'—' if err is None else f'{err:.4f}'} |")
    lines += ["", "± is the evaluator's standard error (a 95% interval is ± 1.96 × stderr). Evaluators: "
              + ", ".join(f"`{e['name']}` ({_params(e)})" for e in s.get("evaluators", [])) + ".", ""]
    size = record.get("size", {})
    lines += ["## Size", "", f"- bits per weight: {size.get('bits_per_weight', '—')}",
              f"- weights in memory: {size.get('storage_bytes', 0) / 1e6:.3f} MB",
              f"- this folder on disk: {_folder_bytes(folder) / 1e6:.3f} MB", "", "## Cost", ""]
    lines += [f"- {k}: {round(v, 3) if isinstance(v, float) else v}" for k, v in record.get("cost", {}).items()]
    prov = record.get("provenance", {})
    lines += ["", "## Provenance", "", f"- started {record.get('started_at', '—')}, finished {record.get('finished_at', '—')}"]
    # the host name stays in result.json: a card is meant to be published
    lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in prov.items() if k != "host"]
    if rebuilt:
        lines.append("- the weights were rebuilt after the run by re-running this cell's pipeline "
                     "(prepare → distill → convert, same settings and seed); the numbers above are the run's")
    lines += ["", "## Use", ""] + use_lines(folder)
    produced = record.get("recipe") or {}
    text = produced.get("text") or ((store.root / "recipe.toml").read_text() if (store.root / "recipe.toml").is_file() else "")
    if text:
        lines += ["## The recipe that produced it", "", "```toml", text.rstrip(), "```", ""]
        if produced.get("overrides"):
            lines += ["with " + " ".join(f"`--set {o}`" for o in produced["overrides"]), ""]
    return "\n".join(lines)
