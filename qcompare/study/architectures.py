"""The architecture matrix: every tiny family × built-in quantizer through the runner's own checks
(``qcompare.testing.check_one``), and the page it writes (docs/architectures.md, with its rows in
docs/architectures.json, by ``scripts/architectures.py``). The families: the dense ones
``qcompare.testing`` curates and every mixture-of-experts family of the installed transformers
(``qcompare.families.moe_families``). tests/study/test_architectures.py recomputes the rows of
``CHECKED_IN_CI`` and holds them, and the page, to the stored rows.

Study code: it names the built-in quantizers it sweeps, which the library itself never does."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qcompare.errors import QcompareError
from qcompare.sdk import checks
from qcompare.testing import check_one, tiny_model

DENSE_FAMILIES = ("qwen3", "llama", "mistral", "gemma", "gemma3_text", "phi3", "olmo2", "gpt_neox", "falcon", "gpt2",
                  "gpt_bigcode")
# the rows CI recomputes: one dense family of each layout (separate q/k/v, fused qkv and gate/up,
# parallel attention and MLP, Falcon's own Linear, GPT-2's Conv1D: the others differ from Qwen3 in
# norms and scales only), the curated mixtures of experts, and one of each kind the builder derives
# (latent attention with a dense first layer, a sparse-attention indexer, per-expert checkpoints fused
# back by qcompare.compat, linear attention and Mamba hybrids, a family transformers cannot run)
CHECKED_IN_CI = ("qwen3", "phi3", "gpt_neox", "falcon", "gpt2", "qwen3_moe", "mixtral", "olmoe", "llama4_text",
                 "deepseek_v3", "deepseek_v32", "granitemoe", "qwen3_next", "nemotron_h", "doge")


def matrix_families() -> tuple[str, ...]:
    """The dense families, then every mixture-of-experts family of the installed transformers."""
    from qcompare.families import moe_families

    return DENSE_FAMILIES + tuple(moe_families())
QUICK_CALIBRATION = {"calibration_samples": 16, "calibration_length": 64}
MATRIX_QUANTIZERS = (("torchao int2", "torchao", {"bits": 2, "group_size": 0}),
                     ("torchao int4", "torchao", {"bits": 4, "group_size": 32}),
                     ("torchao int8", "torchao", {"bits": 8, "group_size": 32}),
                     ("gptq int4", "gptq", {"bits": 4, "group_size": 32, **QUICK_CALIBRATION}),
                     ("awq int4", "awq", {"bits": 4, "group_size": 32, **QUICK_CALIBRATION}),
                     ("nvfp4", "nvfp4", {}),
                     ("mxfp4", "mxfp4", {}),
                     ("fp8", "fp8", {}),
                     ("bnb nf4", "bnb", {}))


def architecture_matrix(folder: Path, families=None, quantizers=MATRIX_QUANTIZERS, progress=None) -> list[dict]:
    """Every family × quantizer through the runner's checks: a row each, with what happened
    (``ok``, ``refused`` with its line, ``failed`` with the failed check's line, or ``unbuilt`` where
    transformers' own forward fails on the tiny model). ``progress(family)`` is called as each starts."""
    from qcompare.sdk.registry import get_registry

    registry, rows, pending = get_registry(), [], []
    for family in families or matrix_families():
        if progress:
            progress(family)
        unbuilt = _cannot_build(family)
        for label, name, params in quantizers:
            row = {"family": family, "quantizer": label}
            rows.append(row)
            if unbuilt:
                row.update(status="unbuilt", reason=unbuilt)
                continue
            cls = registry.get("quantizer", name)
            where = Path(folder) / f"{family}-{label.replace(' ', '-')}"
            try:
                report = check_one(cls(), cls.Params(**params), family, where, checks.DEFAULT_MIN_COVERAGE, reload=False)
            except checks.CheckFailed as e:
                row.update(status="failed", reason=str(e))
            except QcompareError as e:
                row.update(status="refused", reason=str(e))
            except Exception as e:  # noqa: BLE001 - a crash is a result of the matrix too
                row.update(status="failed", reason=_one_line(e))
            else:
                if report["save"]["refused"]:
                    row.update(status="refused", reason=f"cannot be saved: {report['save']['refused']}")
                    continue
                row.update(status="ok", coverage=report["coverage"]["body"], bits=report["size"]["bits_per_weight"],
                           fake_vs_converted=report["fake_vs_converted"]["max_abs_diff"])
                pending.append((row, report["saved"], report["fingerprint"]))
    results = checks.reload_all([(saved, fp) for _, saved, fp in pending], checks.dtype_tolerance("torch.float32"))
    for (row, _, _), result in zip(pending, results):
        if isinstance(result, checks.CheckFailed):
            row.update(status="failed", reason=str(result))
        else:
            row["reload"] = result["max_abs_diff"]
    return rows


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _cannot_build(family: str) -> str | None:
    """Why the tiny model of ``family`` does not run a forward pass (transformers' own code), or None."""
    import torch

    try:
        with torch.no_grad():
            tiny_model(family)(torch.randint(3, 100, (1, 8)))
    except Exception as e:  # noqa: BLE001 - the family's own code fails: said on the page
        return f"transformers' own forward fails on the tiny model: {_one_line(e)}"
    return None


def rows_json(rows: list[dict]) -> str:
    """The matrix's rows as stored beside the page (floats as the page's precision needs them)."""
    def stored(r):
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in r.items()}
    return json.dumps([stored(r) for r in rows], indent=1, ensure_ascii=False) + "\n"


def _reason_kind(reason: str) -> str:
    """A reason without the quantizer's name and format: the float formats refuse one layout in one way."""
    reason = re.sub(r"^[\w ]+: ", "", reason)
    return re.sub(r"\b(torchao|bitsandbytes)'s (NVFP4|MXFP4|FP8|NF4)\b", "the format's", reason)


def matrix_markdown(rows: list[dict]) -> str:
    """docs/architectures.md from ``architecture_matrix``'s rows."""
    quantizers = list(dict.fromkeys(r["quantizer"] for r in rows))
    families = list(dict.fromkeys(r["family"] for r in rows))
    cell = {(r["family"], r["quantizer"]): r for r in rows}

    def text(r):
        if r["status"] == "ok":
            exact = "≡" if r["fake_vs_converted"] == 0 and r["reload"] == 0 else "≈"
            return f"✓ {r['coverage']:.1%} · {r['bits']:.2f} b {exact}"
        return {"refused": "refused", "unbuilt": "not built"}.get(r["status"], "✗ failed")

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "failed", "unbuilt")}
    clean = [f for f in families if all(cell[(f, q)]["status"] in ("ok", "refused") for q in quantizers)]
    lines = ["# Architectures", "",
             "<!-- generated by `python scripts/architectures.py` from qcompare.study.architectures.architecture_matrix "
             "(rows in architectures.json); tests/study/test_architectures.py recomputes the rows of CHECKED_IN_CI "
             "and fails when they, or this page, disagree with the stored rows -->", "",
             f"The families: {len(DENSE_FAMILIES)} dense ones and every mixture-of-experts family of the pinned "
             f"transformers ({len(families) - len(DENSE_FAMILIES)}). Each is a tiny random-weight model built from "
             "the family's own config class (`qcompare.families`: 2 to 4 layers, one of each kind a hybrid mixes, "
             "hidden 64, 4 experts) and run through what the runner checks in every cell: prepare → a few training "
             "steps → convert → fake ≡ converted → coverage → save → reload in a fresh Python exactly as the model "
             "card says.", "",
             f"{counts['ok']} cells pass, {counts['refused']} are refused in one line, {counts['failed']} fail a check "
             f"or crash, {counts['unbuilt']} cannot be built; in {len(clean)} of {len(families)} families every cell passes "
             "or is refused.", "",
             "A cell reads `✓ coverage · bits ≡`: the share of the body's weights quantized, the true bits per "
             "quantized weight (codes at the format's width, scales and zero points as stored), and `≡` when the "
             "converted model computes exactly what the trained student computed and the saved folder reloads to "
             "exactly those logits (`≈`: within the dtype's tolerance). `refused`: the quantizer says in one line "
             "that it cannot take the family; `✗`: a check failed or the quantizer crashed; `not built`: "
             "transformers' own forward fails on the tiny model (all below).", "",
             "| family | " + " | ".join(quantizers) + " |", "|---|" + "---|" * len(quantizers)]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(text(cell[(f, q)]) for q in quantizers) + " |")
    notes = []
    for f in families:
        groups: dict[tuple, list] = {}
        for q in quantizers:
            r = cell[(f, q)]
            if r["status"] != "ok":
                groups.setdefault((r["status"], _reason_kind(r["reason"])), []).append(r)
        for (status, _), same in groups.items():
            also = f", as for {', '.join(r['quantizer'] for r in same[1:])}" if len(same) > 1 else ""
            notes.append(f"- **{f} × {same[0]['quantizer']}** ({status}{also}): {same[0]['reason']}")
    if notes:
        lines += ["", "## Refusals and failures", ""] + notes
    lines += ["", "## What it takes", "",
              "- Mixture-of-experts models keep their experts as fused 3-D parameters in transformers 5. torchao "
              "quantizes them where they are (per expert, groups along the input dimension, the grid of a Linear "
              "layer), and the converted model runs the model's own experts forward on them; GPTQ and AWQ go through "
              "llm-compressor, which splits experts into one Linear each. Exports of either are compressed-tensors "
              "checkpoints whose per-expert names are the ones transformers' loader fuses back (Mixtral's "
              "`w1`/`w3`/`w2`). Routers stay float unless `routers = true` (torchao). Asymmetric grids on experts "
              "cannot be exported: transformers' fused-expert loader takes no zero points.",
              "- GPT-2's `Conv1D` layers are quantized by torchao as Linear layers and saved back in `Conv1D` layout; "
              "llm-compressor (GPTQ, AWQ) does not quantize `Conv1D` and refuses.",
              "- validate refuses a model whose body keeps more than 1 − `min_coverage` of its weights in layers of "
              "no kind a quantizer finds (`checks.coverage_in_reach`: Aria's grouped GEMM experts, Mamba's "
              "`nn.Conv1d`, hyper-connection mixers, LongCat's experts with zero-compute slots): the coverage check "
              "after convert would fail every such cell. A lower `min_coverage` lets the study run.",
              "- A fake quantizer stands for a weight only where the weight is read inside its layer's forward by a "
              "plain product. Every quantizer refuses, naming the `skip` pattern that leaves it float, a weight "
              "the model reads itself past its layer (Jamba's `dt_proj`, LongCat's router `classifier`) and a "
              "Linear subclass computing another product (DeepSeek-V4's grouped `o_a_proj`), found by one probe "
              "forward (`check_read_in_forward`).",
              "- GPTQ and AWQ refuse, before calibrating, fused experts llm-compressor does not split into one "
              "Linear per expert (JetMoE's) and a split that does not compute what the experts computed "
              "(MiniMax-M3's, which drops `swiglu_alpha`): the split runs first and is held to the model's function "
              "(the record's expert-split check). A layer GPTQ's calibration gathers no statistics for (Gemma 4's "
              "`per_layer_model_projection`) is named with the skip that leaves it float, where llm-compressor "
              "stopped with \"No statistics available\".",
              "- Falcon and GPT-2 exports with torchao weights, Falcon's and GPTBigCode's compressed-tensors exports, "
              "and the compressed-tensors exports of IBM Granite's, Gemma 4's, GPT-OSS's, Inkling's and MiniMax-M3's "
              "experts load after `import qcompare.compat` (transposed int products, weight initialisations that "
              "read a compressed layer's weight, and the converters "
              "that fuse one Linear per expert back into the 3-D experts, which the pinned transformers/torchao "
              "lack); their model cards say so.",
              "- AWQ uses llm-compressor's layer mappings where it has them, the Qwen3-MoE mappings for other "
              "mixture-of-experts models (their routers balanced), and qcompare's own for Falcon and GPT-NeoX. "
              "validate resolves them on the model's layers as llm-compressor's oneshot will, and refuses in one line "
              "a family they do not fit (a router by another name or without a weight, a dense layer among expert "
              "layers, linear-attention layers without q/k/v). At calibration every layer that reads a smoothing "
              "layer's output inside the block joins its balance layers (Qwen2-MoE's shared expert and its gate, "
              "DeepSeek-V2's and GLM-4-MoE-Lite's routers, which the sets as written leave out), "
              "and the smoothed float model is held to the teacher's function module by module "
              "(`checks.FunctionWatch`, the record's transform check). A reader AWQ cannot balance is refused naming "
              "it: one with no 2-D weight to scale (Inkling's shared experts), or one outside the module "
              "llm-compressor reruns for the mapping (GLM-MoE-DSA's indexer). "
              "Smoothing it skips is recorded in the cell (`notes.awq.skipped_smoothing`) and shown by the report.",
              "- The float formats (NVFP4, MXFP4, FP8, bitsandbytes NF4/FP4) hold plain Linear layers: torchao's "
              "float tensors and bitsandbytes' `Linear4bit` take no fused 3-D experts (skip `*.experts` and lower "
              "`min_coverage` to study the rest), torchao's have no transposed layout for GPT-2's `Conv1D` (bitsandbytes "
              "quantizes it, as transformers' integration does), and Linear subclasses with their own product "
              "(Falcon's `FalconLinear`) are refused. The tiny families' layers (64 wide) make NVFP4's and MXFP4's "
              "128-row scale tiles part padding, hence their bits here; bitsandbytes' per-layer code tables weigh "
              "the same way (docs/quantizers.md).", ""]
    return "\n".join(lines)
