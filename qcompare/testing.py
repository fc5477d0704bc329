"""For plugin authors' tests: tiny models of many layouts, a tiny chat world, and
``check_quantizer`` — the runner's own checks run on a quantizer, so a plugin's test suite and
qcompare's runner agree by construction.

    from qcompare.testing import check_quantizer
    from my_package import MyQuantizer

    def test_my_quantizer_passes_qcompares_checks(tmp_path):
        check_quantizer(MyQuantizer, {"bits": 4}, folder=tmp_path)

Everything here is built in memory from transformers' configs (no hub, no files), in a second
or two on a CPU.
"""

from __future__ import annotations

import copy
import random
import tempfile
from pathlib import Path
from typing import Any

from qcompare.sdk import checks, footprint
from qcompare.errors import QcompareError

# Shared shape of every tiny model: a forward pass takes milliseconds.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2)
# transformers model type → what its tiny config adds to SHAPE
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=16),
    "llama": {},
    "qwen2": {},
    "mistral": dict(head_dim=16, sliding_window=None),
    "gemma": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi3": {},
    "olmo2": {},
    "gpt_neox": {},
    "falcon": {},
    "gpt2": {},
    "qwen3_moe": dict(head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE),
    "mixtral": dict(num_local_experts=4, **MOE),
    "olmoe": dict(num_experts=4, **MOE),
    # experts stored (experts, in, out) with no flag saying so
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64),
    # experts with biases beside their 3-D weights (gate_up_proj_bias), attention sinks
    "gpt_oss": dict(head_dim=16, num_local_experts=4, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=8, **MOE),
}
# The layouts a quantizer must cope with, each shown by one family.
LAYOUTS = {
    "gqa": "qwen3",  # grouped-query attention, separate q/k/v
    "fused-qkv": "phi3",  # one qkv_proj and one gate_up_proj Linear
    "tied-embeddings": "gemma",  # lm_head is the embedding matrix
    "moe-experts": "qwen3_moe",  # experts fused into 3-D parameters, a non-Linear router
    "conv1d": "gpt2",  # transformers' Conv1D (weights stored in × out)
}


def tiny_config(family: str, vocab_size: int = 128, **overrides):
    """The tiny config of ``family``: one of ``FAMILIES`` as written there, or any other causal-LM
    family transformers ships, derived from its own config class (``qcompare.families``);
    ``overrides`` change any of its sizes (``hidden_size=32``, ...)."""
    import torch
    from transformers import AutoConfig

    if family in FAMILIES:
        return AutoConfig.for_model(family, vocab_size=vocab_size, dtype=torch.float32,
                                    **{**SHAPE, **FAMILIES[family], **overrides})
    from qcompare.families import causal_lm_families, family_config

    if family not in causal_lm_families():
        raise QcompareError(f"unknown tiny model family {family!r}: not a causal-LM model type of the installed "
                            f"transformers; allowed: {', '.join(FAMILIES)} or any of transformers' causal-LM model types")
    return family_config(family, vocab_size=vocab_size, **overrides)


def tiny_model(family: str, vocab_size: int = 128, seed: int = 0, **overrides):
    """A random-weight float32 causal LM of ``family`` (a transformers model type): 2 layers,
    hidden 64, 4 heads (4 experts for the MoE families), unless ``overrides`` say otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny_model(folder, family: str = "qwen3", vocab_size: int = 64, seed: int = 0, **overrides) -> Path:
    """``tiny_model`` with ``tiny_tokenizer`` saved as a Hugging Face folder: a model a recipe can name."""
    folder = Path(folder)
    tiny_model(family, vocab_size, seed, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- a tiny chat world ---------------------------------------------------------------------

SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>"]
WORDS = ["what", "is", "plus", "it", "maybe"] + [str(i) for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer of 50 tokens with a chat template (pad 0, eos 2, as SHAPE says)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=64)


def tiny_teacher(seed: int = 0):
    """The tiny chat world's teacher: a Qwen3 over ``tiny_tokenizer``'s vocabulary, its head sharpened so
    that divergences to it are not all near zero."""
    import torch

    model = tiny_model("qwen3", vocab_size=len(tiny_tokenizer()), seed=seed, max_position_embeddings=128,
                       bos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


def tiny_student(teacher, fake_quant: bool = True, skip_head: bool = False):
    """A trainable copy of ``teacher``; with ``fake_quant`` its Linear layers are torchao int4 QAT
    (group 32), the lm_head too unless ``skip_head``."""
    student = copy.deepcopy(teacher).train()
    if fake_quant:
        import torch
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.qat import QATConfig

        base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        keep = (lambda m, fqn: fqn != "lm_head" and isinstance(m, torch.nn.Linear)) if skip_head else None
        quantize_(student, QATConfig(base, step="prepare"), filter_fn=keep)
    return student


def tiny_context(folder, seed: int = 0, **fields):
    """A CellContext for calling a plugin by hand (on the CPU); ``fields``: teacher, tokenizer, data, ..."""
    from qcompare.sdk.api import CellContext

    return CellContext(cell_dir=Path(folder), seed=seed, device="cpu", **{"tokenizer": None, **fields})


def tiny_chat(n: int = 24, seed: int = 0):
    """``n`` little sums as chat ``messages``: calibration and training data for the tiny world."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(20), rng.randrange(20)
        answer = f"it is {a + b}" if rng.random() < 0.7 else f"maybe {a + b}"
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}"},
                                  {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


# --- check_quantizer -------------------------------------------------------------------------


def _train_a_little(student, teacher, steps: int = 3):
    """A few Adam steps of KL(teacher‖student) on random tokens, so the student's weights leave
    the grid prepare put them on (a convert that ignores training then shows)."""
    import torch

    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.get_input_embeddings().num_embeddings
    student.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 12), generator=gen)
        with torch.no_grad():
            target = teacher(ids).logits.float().log_softmax(-1)
        logp = student(ids).logits.float().log_softmax(-1)
        loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()


def check_one(quantizer, params, family: str, folder: Path, min_coverage: float, reload: bool = True) -> dict[str, Any]:
    """The runner's checks on one tiny model: training reaches and moves the quantized weights, the groups
    run along the input features (where the quantizer declares ``input_groups``), fake ≡ converted, coverage, true size, save → the folder ships the true size → reload ≡. Raises
    CheckFailed / AssertionError with one line; a QcompareError from ``check_model`` (what validate runs), ``prepare`` or ``convert`` means the
    quantizer refuses this layout; one from ``save`` that it cannot save it (``report["save"]["refused"]``
    holds the line, and nothing is reloaded). With
    ``reload=False`` the saved folder is not reloaded here: the report's ``saved`` and ``fingerprint`` let
    a caller reload many at once (``checks.reload_all``, one process per batch)."""
    from qcompare.sdk.api import CellContext
    from qcompare.sdk.saving import save_converted
    tokenizer = tiny_tokenizer()
    teacher = tiny_model(family, vocab_size=128)
    context = CellContext(cell_dir=folder, seed=0, device="cpu", tokenizer=tokenizer, teacher=teacher,
                          data=tiny_chat())
    checks.takes_layout(teacher, quantizer, params, min_coverage)  # what validate checks on the meta model
    student = quantizer.prepare(copy.deepcopy(teacher), params, context)
    report: dict[str, Any] = {"family": family, **context.checks}  # the plugin's own (a transform's)
    watch = checks.TrainingWatch(teacher, student, adapters=False)  # the runner's check of a trained cell
    _train_a_little(student, teacher)
    report["training"] = watch.verdict(student)
    grid = quantizer.input_groups(params)
    if grid is not None:
        report["grid"] = checks.groups_along_inputs(teacher, student, *grid)
    student_logits = checks.probe_logits(student)
    model = quantizer.convert(student, params, context)
    model_logits = checks.probe_logits(model)
    report["fake_vs_converted"] = checks.fake_vs_converted(student_logits, model_logits,
                                                           checks.tolerance(quantizer, params, model))
    measured = footprint.measure(teacher, model, quantizer.code_bits(params))
    report["size"] = measured.as_size(quantizer.bits_per_weight(params))
    report["coverage"] = checks.coverage(measured, min_coverage, checks.expected_on_grid(teacher, quantizer, params))
    saved = folder / "saved"
    try:
        save_converted(quantizer, model, params, saved, context)
    except QcompareError as e:  # the quantizer declares it cannot save this model: the cell keeps its results
        if "\n" in str(e).strip():
            raise AssertionError(f"save refused in more than one line: {str(e)[:300]!r}") from None
        report["save"] = {"refused": str(e)}
        return report
    report["save"] = {"refused": None}
    tokenizer.save_pretrained(saved)
    report["saved_size"] = checks.saved_size(saved, report["size"])
    fingerprint = checks.Fingerprint.of(model, model_logits)
    if reload:
        report["reload"] = checks.reload(saved, fingerprint, checks.dtype_tolerance("torch.float32"))
    else:
        report["saved"], report["fingerprint"] = saved, fingerprint
    return report


def check_quantizer(quantizer_cls, params: dict | Any = None, layouts=tuple(LAYOUTS), folder: str | Path | None = None,
                    min_coverage: float = checks.DEFAULT_MIN_COVERAGE, refuse: tuple[str, ...] = (),
                    saves: bool = True) -> dict:
    """Run qcompare's checks on ``quantizer_cls`` with ``params`` on a tiny model of each layout.

    For every layout in ``layouts`` (see ``LAYOUTS``): gradients flow through the fake quantizer and
    a few optimizer steps move every quantized layer's weights; the converted model computes what the
    trained student computed (within the quantizer's declared tolerance); at least ``min_coverage``
    of the body's weights end quantized; the saved folder ships the tensor bytes of the model's true
    size (``checks.saved_size``); and it reloads in a fresh Python, as its model card says, to the
    same logits (``AutoModelForCausalLM.from_pretrained``, or the quantizer's own ``load`` through
    ``qcompare.load_pretrained``). The layouts in ``refuse`` must instead be refused with a one-line
    QcompareError. ``saves=False`` declares a format that cannot be saved: ``save`` must then raise a
    one-line QcompareError (``report[layout]["save"]["refused"]``), and everything before it is still
    checked. Returns each layout's measurements; raises AssertionError naming the layout and the
    failed check.
    """
    quantizer = quantizer_cls()
    if params is None or isinstance(params, dict):
        params = quantizer_cls.Params(**(params or {}))
    unknown = [name for name in (*layouts, *refuse) if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layouts {unknown}; allowed: {', '.join(LAYOUTS)}")
    results, saved = {}, []
    with tempfile.TemporaryDirectory(prefix="qcompare-check-") as scratch:
        base = Path(folder) if folder is not None else Path(scratch)
        for layout in (*layouts, *refuse):
            where = base / layout
            where.mkdir(parents=True, exist_ok=True)
            try:
                results[layout] = check_one(quantizer, params, LAYOUTS[layout], where, min_coverage, reload=False)
            except checks.CheckFailed as e:
                raise AssertionError(f"{quantizer_cls.name} on {layout} ({LAYOUTS[layout]}): {e}") from None
            except QcompareError as e:
                if layout not in refuse:
                    raise AssertionError(f"{quantizer_cls.name} refused {layout} ({LAYOUTS[layout]}): {e}") from None
                results[layout] = {"refused": str(e)}
                continue
            except AssertionError as e:
                raise AssertionError(f"{quantizer_cls.name} on {layout} ({LAYOUTS[layout]}): {e}") from None
            if layout in refuse:
                raise AssertionError(f"{quantizer_cls.name} was expected to refuse {layout} but ran")
            refused = results[layout]["save"]["refused"]
            if refused and saves:
                raise AssertionError(f"{quantizer_cls.name} on {layout} ({LAYOUTS[layout]}): save refused ({refused}); "
                                     "pass saves=False if the format cannot be saved")
            if not refused and not saves:
                raise AssertionError(f"{quantizer_cls.name} on {layout} ({LAYOUTS[layout]}): saved a folder, but "
                                     "saves=False declares that it cannot be saved")
            if not refused:
                saved.append(layout)
        # every saved folder reloaded in one fresh process, as its model card says
        reloads = checks.reload_all([(results[k].pop("saved"), results[k].pop("fingerprint")) for k in saved],
                                    checks.dtype_tolerance("torch.float32"))
        for layout, result in zip(saved, reloads):
            if isinstance(result, checks.CheckFailed):
                raise AssertionError(f"{quantizer_cls.name} on {layout} ({LAYOUTS[layout]}): {result}")
            results[layout]["reload"] = result
    return results
