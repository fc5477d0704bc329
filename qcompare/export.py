"""A finished cell as a Hugging Face model folder: weights, tokenizer and a model card.

The weights come from the cell's saved ``model/`` folder (recipe option ``save_models``) or,
when the run did not keep them, from re-running the cell's pipeline with the Runner (same
seed, same settings), so an exported model is always the one that was evaluated.
"""

from __future__ import annotations

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
    from qcompare.results import group_columns, load_run

    df = load_run(root)
    df = df[df["quantizer"] != "teacher"] if not df.empty else df
    if df.empty:
        raise QcompareError(f"export_best: no finished quantized cell in {root}")
    if metric not in df.columns:
        known = sorted(c for c in df.columns if "/" in c and ":" not in c) + (["average"] if "average" in df else [])
        raise QcompareError(f"export_best: unknown metric {metric!r}; known: {', '.join(known)}")
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
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        if not overwrite:
            raise QcompareError(f"{to} exists and is not empty; give a new folder (or --force to replace it)")
        shutil.rmtree(to) if to.is_dir() else to.unlink()
    saved = store.cell_dir(record["id"]) / "model"
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an exported model is meant to be shared
    try:
        if (saved / "config.json").is_file():
            shutil.copytree(saved, staging, dirs_exist_ok=True)
            rebuilt = False
        else:
            seed = record["settings"]["seed"]
            say(f"the model of cell {record['id']} was not saved during the run (save_models = false); rebuilding it: "
                f"prepare → distill → convert{'' if seed is None else f' with seed {seed}'}")
            rebuild(store, record, staging, say)
            rebuilt = True
        (staging / "README.md").write_text(model_card(store, record, staging, rebuilt))
        if to.is_dir():
            to.rmdir()  # empty (checked above)
        staging.rename(to)  # the whole folder at once: an interrupted export leaves no half model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


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
    from qcompare.cells import Cell
    from qcompare.recipe import PluginChoice, validate
    from qcompare.runner import Runner

    s = record["settings"]
    cell = Cell(s["model"], PluginChoice(**s["quantizer"]), PluginChoice(**s["distiller"]), s["seed"],
                (json.dumps(s["data"], sort_keys=True), json.dumps(s["evaluators"], sort_keys=True)))
    if cell.id != record["id"]:
        raise QcompareError(f"cell {record['id']}: its settings.json no longer hashes to its id; cannot rebuild it")
    source = store.root / "recipe.toml"
    # The stored settings, not the recipe file (--set overrides are not in it), decide the cell.
    raw = {"name": store.root.name, "models": [s["model"]], "seeds": [s["seed"] or 0], "teacher": False,
           "data": s["data"], "quantizers": [{"name": cell.quantizer.name, **cell.quantizer.params}],
           "distillers": [{"name": cell.distiller.name, **cell.distiller.params}]}
    recipe = validate(raw, source, source.read_text() if source.exists() else "")
    runner = Runner(recipe, store)
    ran_on = record.get("cost", {}).get("device")
    if ran_on and ran_on != runner.device:
        say(f"warning: cell {record['id']} ran on {ran_on} and is rebuilt on {runner.device}; "
            "training numerics may differ slightly (save_models = true keeps the exact model)")
    with tempfile.TemporaryDirectory(prefix="qcompare-rebuild-") as scratch:
        # Checkpoints and trainer logs of the rebuild go to scratch, never into the stored cell.
        ctx = runner.context(cell, Path(scratch), trackers=False)
        runner.save_model(runner.converted_model(cell, ctx), ctx, folder)


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


def model_card(store: RunStore, record: dict, folder: Path, rebuilt: bool) -> str:
    s = record["settings"]
    q, d = s["quantizer"], s["distiller"]
    name = f"{Path(s['model']).name}-{q['name']}-{d['name']}-{record['id']}"
    meta = {"base_model": s["model"], "library_name": "transformers",
            "tags": ["qcompare", "quantization", q["name"]] + ([d["name"]] if d["name"] != "none" else []),
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
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    recipe = store.root / "recipe.toml"
    if recipe.is_file():
        lines += ["## The recipe that produced it", "", "```toml", recipe.read_text().rstrip(), "```", ""]
    return "\n".join(lines)
