"""The model card (``README.md``) of an exported cell: Hugging Face metadata and the cell's story."""

from __future__ import annotations

import json
from pathlib import Path

from qcompare.results.record import CellRecord
from qcompare.sdk.saving import (ADAPTER_CONFIG, FORMAT_FILE, is_compressed_tensors, load_code, needs_compat,
                             read_format, tensor_bytes)


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def _params(choice) -> str:
    params = getattr(choice, "params", None) if not isinstance(choice, dict) else choice.get("params")
    if not params:
        return "(no parameters)"
    return ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in params.items())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def model_index(record: CellRecord, name: str) -> list[dict]:
    """Hugging Face ``model-index``: one result per task, each metric with its stderr beside it."""
    by_task: dict[str, list[dict]] = {}
    for key, value in record.metrics.items():
        task, _, metric = key.partition("/")
        entries = by_task.setdefault(task, [])
        entries.append({"type": metric, "value": float(value), "name": key})
        if record.stderr.get(key) is not None:
            entries.append({"type": f"{metric}_stderr", "value": float(record.stderr[key]), "name": f"{key} stderr"})
    results = [{"task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": task, "type": task}, "metrics": metrics} for task, metrics in by_task.items()]
    return [{"name": name, "results": results}]


def use_lines(folder: Path) -> list[str]:
    """The card's "Use" section: the code that loads this folder to the evaluated model (the reload
    check runs this very code, ``qcompare.sdk.saving.load_code``, in a fresh process)."""
    own = read_format(folder)
    if own is not None:
        return own_format_lines(own, folder) + ["```python", *load_code(folder),
                                                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
                                                "```", ""]
    lines = []
    if (folder / ADAPTER_CONFIG).is_file():
        lines = ["The folder holds the quantized base model (`config.json`, `model.safetensors`) and the LoRA adapter "
                 "trained on it (`adapter_config.json`, `adapter_model.safetensors`: float, not merged, since merging "
                 "would re-quantize the weights and change the model). transformers loads both at once from the "
                 "folder (`peft` must be installed); a loader that ignores the adapter files gets the base alone, "
                 "which is not the evaluated model. Before uploading the folder to the Hugging Face Hub, set "
                 "`base_model_name_or_path` in `adapter_config.json` to the repository's id: transformers takes the "
                 "base of a Hub repository with an adapter from there (a local folder is its own base)."]
        if is_compressed_tensors(folder):
            lines[0] += (" The adapter needs the compressed-tensors weights dequantized on load "
                         "(`dequantize=True`: the same values, held in float; transformers warns that it "
                         "overrides that loading attribute of the folder's config).")
        lines.append("")
    if needs_compat(folder):
        lines += ["Loading it needs `pip install qcompare` and `import qcompare.compat` first: this layout's modeling "
                  "code transposes torchao's int weights or initialises Falcon's layers in ways the pinned "
                  "transformers/torchao do not support yet (see `qcompare/compat.py`).", ""]
    code = load_code(folder) + ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
    return lines + ["```python", *code, "```", ""]


def own_format_lines(own: dict, folder: Path) -> list[str]:
    """The "Use" text of a folder in a quantizer plugin's own format."""
    package = own.get("package") or own.get("module")
    version = f" {own['version']}" if own.get("version") else ""
    via = f"entry point `{own['entry_point']}`" if own.get("entry_point") else f"module `{own.get('module')}`"
    text = (f"The folder is in the own format of the quantizer `{own['quantizer']}` (package `{package}`{version}, "
            f"{via}), which transformers does not know: load it with `qcompare.load_pretrained` (after "
            f"`pip install qcompare {package}`), which loads it through that plugin (no remote code; "
            f"`{FORMAT_FILE}` names the plugin and its parameters), not with `AutoModelForCausalLM.from_pretrained`.")
    if (folder / ADAPTER_CONFIG).is_file():
        text += (" It holds the LoRA adapter trained on the quantized base beside it (`adapter_config.json`, "
                 "`adapter_model.safetensors`: float, not merged, since merging would re-quantize the weights); "
                 "`qcompare.load_pretrained` puts it back on the base.")
    return [text, ""]


def model_card(record: CellRecord, run_name: str, folder: Path, rebuilt: bool, recipe_text: str = "",
               proof: dict | None = None, selection: str | None = None) -> str:
    s = record.settings
    q, d = s.quantizer, s.distiller
    name = f"{Path(s.model).name}-{q.name}-{d.name}-{record.id}"
    lora = (folder / ADAPTER_CONFIG).is_file()
    meta = {"base_model": s.model, "library_name": "transformers",
            "tags": ["qcompare", "quantization", q.name] + ([d.name] if d.name != "none" else [])
            + (["lora", "peft"] if lora else []),
            "model-index": model_index(record, name)}
    lines = ["---", _yaml(meta).rstrip(), "---", "", f"# {name}", "",
             f"A quantized **{s.model}** made and evaluated by qcompare "
             f"(cell `{record.id}` of the run `{run_name}`).", "",
             f"- **Base model:** `{s.model}`",
             f"- **Quantizer:** `{q.name}` — {_params(q)}",
             f"- **Distiller:** `{d.name}` — {_params(d)}",
             f"- **Seed:** {'— (no training: the result does not depend on it)' if s.seed is None else s.seed}"]
    if s.data and s.data.get("train"):
        lines.append(f"- **Training data:** `{s.data['train']}` (subset {s.data.get('subset') or 'all'})")
    if selection:
        lines.append(f"- **Chosen as the run's best:** {selection}")
    lines += ["", "## Evaluation", "", "| metric | value | ± stderr |", "|---|---:|---:|"]
    for key, value in record.metrics.items():
        err = record.stderr.get(key)
        lines.append(f"| {key} | {value:.4f} | {'—' if err is None else f'{err:.4f}'} |")
    lines += ["", "± is the evaluator's standard error (a 95% interval is ± 1.96 × stderr). Evaluators: "
              + ", ".join(f"`{e['name']}` ({_params(e)})" for e in s.evaluators) + ".", ""]
    lines += size_lines(record, folder) + ["## Cost", ""]
    lines += [f"- {k}: {round(v, 3) if isinstance(v, float) else v}" for k, v in record.cost.items()]
    lines += checks_lines(record, proof or {})
    lines += ["", "## Provenance", "", f"- started {record.started_at or '—'}, finished {record.finished_at or '—'}"]
    # the host name stays in result.json: a card is meant to be published
    lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}"
              for k, v in record.provenance.items() if k != "host"]
    if record.plugins:
        lines += [f"- plugin {kind}: {json.dumps(info)}" for kind, info in record.plugins.items()]
    if rebuilt:
        lines.append("- the weights were rebuilt after the run by re-running this cell's pipeline "
                     "(prepare → distill → convert, same settings and seed); the numbers above are the run's")
    lines += ["", "## Use", ""] + use_lines(folder)
    produced = record.recipe or {}
    text = produced.get("text") or recipe_text
    if text:
        lines += ["## The recipe that produced it", "", "```toml", text.rstrip(), "```", ""]
        if produced.get("overrides"):
            lines += ["with " + " ".join(f"`--set {o}`" for o in produced["overrides"]), ""]
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def size_lines(record: CellRecord, folder: Path) -> list[str]:
    size = record.size
    lines = ["## Size", "",
             f"- quantized: {_num(size.get('quantized_share_body'), '.1%')} of the body's weights "
             f"(all but embeddings and head), {_num(size.get('quantized_share_model'), '.1%')} of all weights",
             f"- bits per quantized weight: {_num(size.get('bits_per_weight'), '.3f')} as shipped (codes at the "
             f"format's width, scales and zero points as stored; "
             f"{_num(size.get('memory_bits_per_weight'), '.3f')} as held in memory), nominal "
             f"{_num(size.get('nominal_bits'), '.3f')}",
             f"- bits per weight over the whole model (float layers and adapters included): "
             f"{_num(size.get('model_bits_per_weight'), '.3f')}",
             f"- the model at its true size: {_num(size.get('packed_bytes') and size['packed_bytes'] / 1e6, '.3f')} MB; "
             f"in memory: {_num(size.get('memory_bytes') and size['memory_bytes'] / 1e6, '.3f')} MB",
             f"- this folder on disk: {folder_bytes(folder) / 1e6:.3f} MB", ""]
    return lines + disk_lines(record, folder)


def disk_lines(record: CellRecord, folder: Path) -> list[str]:
    """What the folder holds on disk: each tensor file's bytes, their sum against the true size, and the
    format they are in (transformers' quantization config, or a plugin's own)."""
    files = tensor_bytes(folder)
    if not files:
        return []
    total, n = sum(files.values()), record.size.get("parameters")
    method = ((json.loads((folder / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
              if (folder / "config.json").is_file() else None)
    own = read_format(folder)
    fmt = (f"the quantizer `{own['quantizer']}`'s own format" if own else
           f"`{method}` (transformers' quantization config)" if method else "plain safetensors tensors")
    lines = ["## On disk", "", f"- format: {fmt}"]
    lines += [f"- `{name}`: {size / 1e6:.3f} MB of tensors" for name, size in files.items()]
    per_weight = f", {8 * total / n:.3f} bits per weight of the model" if n else ""
    true = record.size.get("packed_bytes")
    lines.append(f"- tensors in all: {total / 1e6:.3f} MB{per_weight}"
                 + (f" ({total / true:.2f}× the true size above)" if true else ""))
    shipped = record.checks.get("saved_size") or {}
    if shipped.get("passed") is False:
        lines.append(f"- **the folder does not ship the model at its true size**: {record.notes.get('saved_size', '')}; "
                     "the bits per weight above describe the converted model, not these files")
    return lines + [""]


def checks_lines(record: CellRecord, proof: dict) -> list[str]:
    """What the run checked (fake ≡ converted, coverage) and what export checked (reload, rebuild)."""
    checks = {**record.checks, **proof}
    if not checks:
        return []
    return ["", "## Checks", ""] + [f"- {k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in checks.items()]
