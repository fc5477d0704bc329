"""Saving a converted model, and loading it back: the one place that decides how.

A LoRA cell's model is the quantized base with float adapters beside its layers (merging
them would re-quantize W + BA, a different function). ``save_converted`` writes the base
with the quantizer's ``save``, exactly as for any cell, and the adapter beside it as a PEFT
adapter (``adapter_config.json``, ``adapter_model.safetensors``), which
``AutoModelForCausalLM.from_pretrained(folder)`` loads together with the base.

A quantizer whose format transformers does not know saves it as itself and declares
``Quantizer.load``; ``save_converted`` then writes ``qcompare_format.json`` naming the quantizer,
its parameters, package and entry point, and ``load_pretrained`` (what the model card shows, the
reload check runs and export proves) loads such a folder through that plugin.

Helpers for plugins: ``save_quantized`` (a transformers quantization config), ``save_int_grid``
(compressed-tensors integer grids), ``save_state``/``load_state`` (a format of one's own),
``lora_layers`` and ``without_adapters``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from qcompare.errors import QcompareError

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
    """Save a converted model into ``folder``: ``quantizer.save`` for the (bare) quantized base,
    then the LoRA adapter beside it if the model carries one."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    if not lora_layers(model):
        quantizer.save(model, params, folder, context)
    else:
        with without_adapters(model) as base:
            quantizer.save(base, params, folder, context)
        save_adapter(model, folder)
    if quantizer.saves_own_format():
        write_format(quantizer, params, folder)


def save_quantized(model, config, folder: Path) -> None:
    """``model.save_pretrained(folder)`` with ``config`` (a transformers quantization config:
    ``TorchAoConfig``, ``BitsAndBytesConfig``) in its ``config.json``, so that ``from_pretrained``
    rebuilds the same low-bit layers. transformers serializes torchao and bitsandbytes tensors
    only for a model that carries an HfQuantizer, as ``from_pretrained`` would have attached;
    both are set for the save and put back after it."""
    from transformers.quantizers.auto import AutoHfQuantizer

    before = (getattr(model.config, "quantization_config", None), getattr(model, "hf_quantizer", None))
    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    try:
        model.save_pretrained(folder)
    finally:
        model.config.quantization_config, model.hf_quantizer = before
        if before[0] is None:
            del model.config.quantization_config


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


def _config(folder: Path) -> dict:
    import json

    config = Path(folder) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def is_compressed_tensors(folder: Path) -> bool:
    """Whether ``folder``'s config says compressed-tensors (GPTQ/AWQ checkpoints)."""
    return (_config(folder).get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def needs_compat(folder: Path) -> bool:
    """Whether loading ``folder`` needs ``import qcompare.compat`` first: that module, which holds the
    patches, says which checkpoints need them."""
    from qcompare.compat_scope import needed_by

    return needed_by(_config(folder))


def load_code(folder: Path, path: str = "path/to/this/folder") -> list[str]:
    """The Python that loads ``folder`` to the evaluated model, with ``path`` as its location: what
    the model card shows a user, and what the reload check runs in a fresh process."""
    own = read_format(folder)
    if own is not None:
        return ["import qcompare", "from transformers import AutoTokenizer", "",
                f"model = qcompare.load_pretrained({path!r})  # through the quantizer {own['quantizer']!r} "
                f"of {own['package']}"]
    lines = ["import qcompare.compat  # ops transformers/torchao lack for this layout (see qcompare/compat.py)"] \
        if needs_compat(folder) else []
    if (Path(folder) / ADAPTER_CONFIG).is_file() and is_compressed_tensors(folder):
        # peft wraps Linear layers that hold a .weight; compressed-tensors keeps them packed unless asked
        return lines + ["from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig", "",
                        "model = AutoModelForCausalLM.from_pretrained(  # base + LoRA adapter",
                        f"    {path!r}, quantization_config=CompressedTensorsConfig(dequantize=True))"]
    adapter = "  # base + LoRA adapter" if (Path(folder) / ADAPTER_CONFIG).is_file() else ""
    return lines + ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                    f"model = AutoModelForCausalLM.from_pretrained({path!r}){adapter}"]


def apply_int_grid(model, grids: dict, bits: int, group_size: int, symmetric: bool = True,
                   actorder: str | None = None) -> None:
    """Attach compressed-tensors' quantization scheme to ``model``'s Linear layers named in ``grids``
    (``name -> (scale, zero_point)``, each (out_features, in_features / group_size)), the rest
    ignored: what ``save_int_grid`` and the built-in quantizers' compressed-tensors writers share.
    ``actorder`` is recorded as given (GPTQ's "static": groups over consecutive columns)."""
    import torch
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from torch import nn

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size or None,
                            actorder=actorder)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in grids]
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=ignore, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, (scale, zero_point) in grids.items():
            m = model.get_submodule(name)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(zero_point.reshape(m.weight_zero_point.shape).round().to(m.weight_zero_point.dtype))


def save_int_grid(model, folder: Path, grids: dict, bits: int, group_size: int, symmetric: bool = True) -> None:
    """Write ``model`` as a compressed-tensors checkpoint (packed integer codes: the format
    llm-compressor writes, vLLM serves and ``AutoModelForCausalLM.from_pretrained`` loads).

    For a quantizer whose codes sit on a per-group integer grid, ``w = (code - zero_point) * scale``
    with groups of ``group_size`` consecutive input features (0: one group per row): ``model``'s
    Linear layers named in ``grids`` hold their weights dequantized (exactly on the grid), and
    ``grids[name] = (scale, zero_point)``, each shaped (out_features, in_features / group_size).
    Every other Linear layer is saved in float."""
    from compressed_tensors.compressors import ModelCompressor

    apply_int_grid(model, grids, bits, group_size, symmetric)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))


# --- a format of the quantizer's own ------------------------------------------------------

FORMAT_FILE = "qcompare_format.json"


def write_format(quantizer, params, folder: Path) -> None:
    """Record in ``folder`` which plugin saved it and how to find that plugin again: its quantizer name and
    parameters, the package (and version) and entry point that provide it, and the module defining it."""
    import json

    from qcompare.version import __version__
    from qcompare.sdk.registry import origin_of

    cls = type(quantizer)
    record = {"quantizer": cls.name, "params": params.model_dump(mode="json"), **origin_of(cls),
              "module": cls.__module__, "qcompare": __version__,
              "load": "qcompare.load_pretrained(folder): transformers does not know this format"}
    (Path(folder) / FORMAT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read_format(folder: Path) -> dict | None:
    """What ``write_format`` recorded in ``folder``, or None for a folder transformers loads itself."""
    import json

    path = Path(folder) / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) and isinstance(record.get("quantizer"), str) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QcompareError(f"{path}: unreadable ({type(e).__name__}: {e}); the folder cannot say which plugin "
                            "loads it") from None


def load_pretrained(folder, device: str | None = None):
    """The model a qcompare folder holds, as the run evaluated it: loaded through the quantizer plugin
    that saved it when the folder is in that plugin's own format (``qcompare_format.json``), else by
    transformers (``AutoModelForCausalLM.from_pretrained``, as the model card shows); a LoRA adapter
    beside the base is loaded with it. On the CPU unless ``device`` says otherwise."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise QcompareError(f"{folder} holds no saved model (no config.json)")
    own = read_format(folder)
    if own is None:
        scope: dict = {}
        exec("\n".join(load_code(folder, str(folder))), scope)  # the model card's own code
        model = scope["model"]
    else:
        from qcompare.sdk.registry import quantizer_for_format

        cls = quantizer_for_format(own, folder)
        model = cls().load(folder, cls.Params.model_validate(own.get("params") or {}))
        if (folder / ADAPTER_CONFIG).is_file():
            load_adapter(model, folder)
    model = model.eval()
    return model if device is None else model.to(device)


def load_adapter(model, folder: Path) -> None:
    """Put the LoRA adapter saved in ``folder`` on ``model``, whose layers may be a plugin's packed
    modules that peft cannot wrap: each is stood in for by an empty Linear of its shape while peft wraps
    it, then put back as the wrapper's base layer (what ``without_adapters`` takes apart on save)."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file
    from torch import nn

    config = PeftConfig.from_pretrained(str(folder))
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(Path(folder) / SAFETENSORS_WEIGHTS_NAME)).items()}
    wrapped = {k.split(".lora_")[0] for k in state}
    stand_ins = {}
    for name in wrapped:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            continue
        if not (isinstance(getattr(layer, "in_features", None), int) and isinstance(getattr(layer, "out_features", None), int)):
            raise QcompareError(f"{folder}: the adapter wraps {name}, a {type(layer).__name__} without in_features and "
                                "out_features, so peft cannot put a LoRA layer on it")
        stand_ins[name] = layer
        model.set_submodule(name, nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta"))
    inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    for name, layer in stand_ins.items():
        model.get_submodule(name).base_layer = layer
    result = set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise QcompareError(f"{folder}: the adapter holds weights no layer takes ({bad[0]}, ...)")
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QcompareError(f"{folder}: the adapter lacks {missing[0]} (and {len(missing) - 1} more)")


STATE_FILE = "qcompare_model.safetensors"


def save_state(model, folder: Path) -> None:
    """For a format of a plugin's own: ``config.json`` (and ``generation_config.json``) as transformers
    writes them, and every tensor of ``model``'s state dict, as stored, in ``qcompare_model.safetensors``
    (a tensor shared by two modules, as tied embeddings are, once). ``load_state`` reads it back.

    Not transformers' ``model.safetensors``: ``AutoModelForCausalLM.from_pretrained`` then refuses the
    folder (no weights file) rather than build the config's model with freshly initialised weights where
    the packed ones were."""
    from safetensors.torch import save_model

    Path(folder).mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    save_model(model, str(Path(folder) / STATE_FILE), metadata={"format": "pt"})


def load_state(folder: Path, put_layers=None):
    """The model ``save_state`` wrote: built from ``config.json`` without initialising weights,
    ``put_layers(model)`` called to put the plugin's own (empty) modules where they were, then every
    tensor read back; a tensor missing or left over is an error naming it."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(folder))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None))
    if put_layers is not None:
        put_layers(model)
    model.tie_weights()  # a tensor shared by two modules is stored once, under the name save_state chose
    try:
        load_model(model, str(Path(folder) / STATE_FILE), strict=True)
    except RuntimeError as e:
        raise QcompareError(f"{folder}: {STATE_FILE} does not fit the model its config builds "
                            f"({(str(e).strip().splitlines() or [''])[0][:300]})") from None
    return model.eval()


def tensor_bytes(folder: Path) -> dict[str, int]:
    """The bytes of tensor data in each ``*.safetensors`` file of ``folder`` (read from the files'
    headers, without loading them): what the folder ships of the model's weights, file by file."""
    import json
    import struct

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out[path.name] = sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return out
