"""Architectures beyond the dense Llama family: mixture-of-experts (fused 3-D experts), GPT-2's
Conv1D, Falcon, GPT-NeoX, OLMo-2 — through every built-in quantizer, and the page that says so."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qcompare.cli import app
from qcompare.study.architectures import (CHECKED_IN_CI, DENSE_FAMILIES, QUICK_CALIBRATION, architecture_matrix,
                                          matrix_families, matrix_markdown, rows_json)
from qcompare.testing import check_quantizer, tiny_model

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

ROOT = Path(__file__).resolve().parents[2]
cli = CliRunner()


def validate_errors(recipe: Path) -> list[str]:
    """``qcompare validate``'s error lines for a recipe it refuses (exit 2)."""
    res = cli.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    return [ln for ln in res.output.splitlines() if ln.startswith("error:")]


def stored_rows() -> list[dict]:
    return json.loads((ROOT / "docs" / "architectures.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", CHECKED_IN_CI)
def test_a_familys_row_of_the_matrix_is_what_the_code_does_now(tmp_path, family):
    rows = json.loads(rows_json(architecture_matrix(tmp_path, families=(family,))))
    assert rows == [r for r in stored_rows() if r["family"] == family], \
        "docs/architectures.json is stale: run python scripts/architectures.py"


def test_the_page_shows_the_stored_rows_of_every_family_and_what_they_promise():
    rows = stored_rows()
    assert list(dict.fromkeys(r["family"] for r in rows)) == list(matrix_families()), \
        "the installed transformers has other families than the page: run python scripts/architectures.py"
    assert (ROOT / "docs" / "architectures.md").read_text() == matrix_markdown(rows)
    by = {(r["family"], r["quantizer"]): r for r in rows}
    for r in rows:
        if r["status"] == "ok":
            # exact, but a reload whose loader re-fuses experts by its own arithmetic (GPT-OSS's interleaving)
            assert r["coverage"] >= 0.95 and r["fake_vs_converted"] == 0 and r["reload"] < 1e-6, r
        assert r["status"] in ("ok", "refused", "failed", "unbuilt") and (r["status"] == "ok") != ("reason" in r)
    # the dense and curated families: refused only where a format cannot hold the layout (GPT-2's Conv1D in
    # llm-compressor and torchao's float tensors; fused experts and Falcon's own Linear subclass in the float
    # formats; AWQ's mappings on Llama 4's router, none for GPTBigCode); nothing fails a check
    floats = ("nvfp4", "mxfp4", "fp8", "bnb nf4")
    curated = DENSE_FAMILIES + ("qwen3_moe", "mixtral", "olmoe", "llama4_text")
    refused = {("gpt2", "gptq int4"), ("gpt2", "awq int4"), *(("gpt2", q) for q in floats if q != "bnb nf4"),
               *((f, q) for f in ("qwen3_moe", "mixtral", "olmoe", "llama4_text", "falcon") for q in floats),
               ("llama4_text", "awq int4"), ("gpt_bigcode", "awq int4")}
    assert {k for k, r in by.items() if k[0] in curated and r["status"] != "ok"} == refused
    assert all(by[k]["status"] == "refused" for k in refused)
    # fused experts are quantized where they are: the body is covered, and int2 is cheaper than int4
    assert by[("qwen3_moe", "torchao int2")]["bits"] < by[("qwen3_moe", "torchao int4")]["bits"]
    # every family transformers cannot run is said to be so, and nothing else is
    assert {f for (f, _), r in by.items() if r["status"] == "unbuilt"} == {"doge"}


def test_fused_experts_train_through_the_fake_quantizer_and_teacher_mode_switches_them_off():
    from qcompare.sdk import fake_quantizers
    from qcompare_plugins.distillers.shared_teacher import teacher_mode
    from qcompare_plugins.torchao_quantizer import TorchaoParams, TorchaoQuantizer

    teacher = tiny_model("qwen3_moe")
    student = TorchaoQuantizer().prepare(copy.deepcopy(teacher), TorchaoParams(bits=2, group_size=0), None)
    experts = student.model.layers[0].mlp.experts
    assert type(experts).__name__ == "FakeQuantizedQwen3MoeExperts" and experts.gate_up_proj.requires_grad
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    student(ids).logits.pow(2).mean().backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    # int2 moves the experts' output; with every fake quantizer off the student is the teacher
    with torch.no_grad():
        expected = teacher(ids).logits
        assert not torch.equal(student(ids).logits, expected)
        assert len(fake_quantizers(student)) > 2 * 2  # the experts' too, not only the Linear layers'
        with teacher_mode(student):
            assert torch.equal(student(ids).logits, expected)


def test_routers_stay_float_unless_asked_and_asymmetric_experts_are_refused_for_export():
    from qcompare_plugins.torchao_quantizer import TorchaoParams, TorchaoQuantizer

    teacher = tiny_model("mixtral")
    float_router = TorchaoQuantizer().prepare(copy.deepcopy(teacher), TorchaoParams(), None)
    assert type(float_router.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    quantized = TorchaoQuantizer().prepare(copy.deepcopy(teacher), TorchaoParams(routers=True), None)
    assert type(quantized.model.layers[0].mlp.gate).__name__ == "FakeQuantizedMixtralTopKRouter"
    # an asymmetric grid trains and converts; only its export is refused, in one line
    report = check_quantizer(TorchaoQuantizer, {"symmetric": False}, layouts=("moe-experts",), saves=False)
    assert report["moe-experts"]["fake_vs_converted"]["passed"]
    assert "use symmetric = true to export MoE models" in report["moe-experts"]["save"]["refused"]


def test_validate_reads_the_layout_from_the_config_and_names_what_cannot_work(tmp_path, tiny_model_dir):
    from qcompare.testing import tiny_tokenizer

    gpt2 = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
models = ["{gpt2}", "{tiny_model_dir}"]
[data]
train = "toy-chat"
[[quantizers]]
name = "gptq"
[[quantizers]]
name = "torchao"
group_size = 64
[[distillers]]
name = "none"
""")
    lines = validate_errors(recipe)
    assert len(lines) == 2, lines
    assert any("quantizer gptq on" in ln and "tiny-gpt2" in ln and "Conv1D" in ln and "torchao quantizer handles"
               in ln for ln in lines)
    # the tiny Qwen3 is 32 wide: a group of 64 does not divide its layers (GPT-2's are 64 wide)
    assert any("quantizer torchao on" in ln and "group_size 64 does not divide" in ln and "(32)" in ln for ln in lines)
    # a fixed recipe passes, and the second look comes from the cache without torch
    recipe.write_text(recipe.read_text().replace('name = "gptq"', 'name = "torchao"\nbits = 8\ngroup_size = 16')
                      .replace("group_size = 64", "group_size = 16"))
    assert cli.invoke(app, ["validate", str(recipe)]).exit_code == 0


def test_an_awq_cell_records_the_smoothing_it_skipped_and_the_report_says_so(tmp_path):
    recipe = tmp_path / "awq.toml"
    recipe.write_text("""
name = "awq"
models = ["toy-qwen3"]
teacher = false
[data]
train = "toy-chat"
[[quantizers]]
name = "awq"
group_size = 32
calibration_samples = 16
calibration_length = 64
[[distillers]]
name = "none"
[[evaluators]]
name = "kl_to_teacher"
dataset = "toy-heldout"
max_samples = 8
""")
    res = cli.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("cells/*/result.json")]
    awq = record["notes"]["awq"]
    # toy-qwen3 has grouped-query attention: v_proj → o_proj cannot be balanced, llm-compressor skips it
    assert awq["skipped_smoothing"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert "awq: skipped smoothing of 2 layers" in res.output and "self_attn.v_proj" in res.output
    # the smoothing kept the float model's function, as the cell's record says beside the runner's checks
    assert record["checks"]["transform"]["passed"] and record["checks"]["transform"]["what"] == "AWQ's smoothing"
    assert {"fake_vs_converted", "coverage", "transform"} <= set(record["checks"])


@pytest.mark.parametrize("name, params", [("torchao", {"bits": 4, "group_size": 32}),
                                          ("gptq", {"bits": 4, "group_size": 32, **QUICK_CALIBRATION})])
def test_expert_biases_are_neither_codes_nor_scale_overhead_and_the_export_reloads(tmp_path, name, params):
    """GPT-OSS keeps float biases beside its fused experts (``gate_up_proj_bias``): they count as float,
    and the bits of the quantized weights are those of their codes, scales and zero points alone. Its
    export (one Linear per expert, gate and up apart) reloads into the interleaved, transposed experts
    (``import qcompare.compat``, as its card says: random experts before, max |Δ| 0.4–0.9)."""
    from qcompare.sdk.checks import DEFAULT_MIN_COVERAGE
    from qcompare.sdk.registry import get_registry
    from qcompare.sdk.saving import load_code
    from qcompare.sdk.targets import all_targets
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", name)
    report = check_one(cls(), cls.Params(**params), "gpt_oss", tmp_path, DEFAULT_MIN_COVERAGE)
    assert report["reload"]["passed"] and "import qcompare.compat" in "\n".join(load_code(tmp_path / "saved"))
    # an independent count over the teacher: the body's Linear and 3-D expert weights, routers left float
    teacher = tiny_model("gpt_oss")
    outside = {id(teacher.get_input_embeddings().weight), id(teacher.get_output_embeddings().weight)}
    body = sum(p.numel() for p in teacher.parameters() if id(p) not in outside)
    quantized = sum(t.weight.numel() for t in all_targets(teacher) if t.kind in ("linear", "experts")
                    and id(t.weight) not in outside)
    assert report["coverage"]["body"] == pytest.approx(quantized / body, abs=1e-6)
    assert report["size"]["bits_per_weight"] == 4 + (32 + 8) / 32  # int4 codes, an fp32 scale and an int8 zero per 32


def test_fused_experts_stored_input_first_without_a_flag_get_their_groups_along_the_input(tmp_path):
    """Llama 4 keeps its experts as (experts, in, out) and says so nowhere: the input axis is found from what
    the forward multiplies (a probe), so torchao's groups run along the input features, as on a Linear."""
    from qcompare.sdk.checks import probe_logits
    from qcompare.sdk.registry import get_registry
    from qcompare.sdk.targets import find_targets, probe_expert_layouts

    model = tiny_model("llama4_text")
    experts = model.model.layers[0].feed_forward.experts
    assert not hasattr(experts, "is_transposed")  # transformers' own flag is absent for this family
    assert set(probe_expert_layouts(model).values()) == {True} and experts.is_transposed
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    assert {t.param: t.in_features for t in find_targets(model, (), ("experts",))
            if t.name == "model.layers.0.feed_forward.experts"} == {"gate_up_proj": hidden, "down_proj": inner}
    quantizer = get_registry().get("quantizer", "torchao")()
    params = quantizer.Params(bits=4, group_size=32)
    student = quantizer.prepare(copy.deepcopy(tiny_model("llama4_text")), params, None)
    before = probe_logits(student)
    model = quantizer.convert(student, params, None)
    assert torch.equal(probe_logits(model), before)  # fake ≡ converted on the probed layout
    codes = model.model.layers[0].feed_forward.experts._buffers
    # each expert's rows hold its input features, and the groups run along them (32 of 64 or 128 inputs)
    assert codes["gate_up_proj"].shape[1] == hidden and codes["down_proj"].shape[1] == inner
    assert tuple(codes["gate_up_proj"].block_size) == (1, 32) == tuple(codes["down_proj"].block_size)


def test_groups_that_run_along_a_fused_weights_output_fail_the_grid_check(tmp_path, monkeypatch):
    """Before the probe, Llama 4's experts got their groups along the output (its storage order) with every
    other check green: fake ≡ converted and the reload use the same wrong grid. The grid check sees it from
    the rounded weights alone, and names the weight."""
    from qcompare.sdk import checks, get_registry
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", "torchao")
    params = cls.Params(bits=4, group_size=32)
    report = check_one(cls(), params, "llama4_text", tmp_path / "probed", checks.DEFAULT_MIN_COVERAGE, reload=False)
    assert report["grid"] == {"levels": 16, "group": 32, "weights": report["grid"]["weights"], "undecidable": False,
                              "across_groups": {}, "passed": True} and report["grid"]["weights"] > 4
    monkeypatch.setattr("qcompare.sdk.probe_expert_layouts", lambda model: {})  # storage order, as before
    with pytest.raises(checks.CheckFailed, match=r"grid: the quantizer's groups do not run along the input features: "
                       r"model\.layers\.\d\.feed_forward\.experts\.(gate_up|down)_proj holds up to \d+ distinct values "
                       r"in 32 consecutive input features, where a grid of 16 levels"):
        check_one(cls(), params, "llama4_text", tmp_path / "storage-order", checks.DEFAULT_MIN_COVERAGE, reload=False)


@pytest.mark.parametrize("name, params", [("torchao", {"bits": 4, "group_size": 32}),
                                          ("gptq", {"bits": 4, "group_size": 32, **QUICK_CALIBRATION})])
def test_a_text_only_llama4_is_saved_and_reloads_exactly(tmp_path, name, params):
    """llm-compressor's Llama 4 expert split reads the multimodal config's text_config, which a text-only
    Llama4ForCausalLM lacks: both the save (torchao's experts as compressed-tensors) and GPTQ's oneshot
    crashed on it."""
    from qcompare.sdk import checks, get_registry
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", name)
    report = check_one(cls(), cls.Params(**params), "llama4_text", tmp_path, checks.DEFAULT_MIN_COVERAGE)
    assert report["save"]["refused"] is None and report["reload"]["passed"] and report["reload"]["max_abs_diff"] == 0
    assert report["coverage"]["body"] > 0.99


def test_validate_refuses_a_body_mostly_out_of_every_quantizers_reach_and_min_coverage_lets_it_run(tmp_path):
    """Zaya keeps part of its body in a Mamba nn.Conv1d, a kind no built-in quantizer finds: the coverage
    check after convert would fail every cell, so validate says so first, from the config alone."""
    zaya = tmp_path / "tiny-zaya"
    tiny_model("zaya").save_pretrained(zaya)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
models = ["{zaya}"]
[data]
train = "toy-chat"
[[quantizers]]
name = "torchao"
group_size = 16
[[distillers]]
name = "none"
""")
    lines = validate_errors(recipe)
    assert len(lines) == 1 and "quantizer torchao on" in lines[0], lines
    assert "coverage: at most 9" in lines[0] and "Conv1d:" in lines[0] and "lower min_coverage" in lines[0]
    recipe.write_text(recipe.read_text().replace("group_size = 16", "group_size = 16\nmin_coverage = 0.85"))
    assert cli.invoke(app, ["validate", str(recipe)]).exit_code == 0


def test_a_quantizer_that_reaches_other_kinds_of_layers_is_left_to_the_coverage_check_after_convert():
    from qcompare.sdk import QcompareError, checks, get_registry

    cls = get_registry().get("quantizer", "torchao")
    zaya = tiny_model("zaya")
    with pytest.raises(QcompareError, match=r"^coverage: at most 9\d% .*Conv1d"):
        checks.coverage_in_reach(zaya, cls(), cls.Params(), checks.DEFAULT_MIN_COVERAGE)

    class ConvToo(cls):  # a plugin that also rounds nn.Conv1d says so
        reaches_other_kinds = True

    checks.coverage_in_reach(zaya, ConvToo(), cls.Params(), checks.DEFAULT_MIN_COVERAGE)
    # what its skip leaves float still counts
    with pytest.raises(QcompareError, match=r"^coverage: at most \d+% .*Linear"):
        checks.coverage_in_reach(zaya, ConvToo(), cls.Params(skip=["lm_head", "*.mlp.*"]), checks.DEFAULT_MIN_COVERAGE)


@pytest.mark.parametrize("name", ["torchao", "gptq"])
def test_a_weight_the_model_reads_past_its_layers_forward_is_refused_naming_the_skip_that_fixes_it(tmp_path, name):
    """Jamba's Mamba mixer multiplies by ``dt_proj.weight`` itself, where no fake quantizer sees it: quantized,
    the converted model would compute what the student never trained. Refused in one line; with the skip
    it names, the cell passes every check (fake ≡ converted exactly)."""
    from qcompare.sdk import QcompareError, checks, get_registry
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", name)
    params = {"bits": 4, "group_size": 16, **(QUICK_CALIBRATION if name == "gptq" else {})}
    with pytest.raises(QcompareError, match=r"JambaMambaMixer reads model\.layers\.1\.mamba\.dt_proj\.weight itself"
                                            r".*add \"\*\.dt_proj\" to skip"):
        check_one(cls(), cls.Params(**params), "jamba", tmp_path / "refused", checks.DEFAULT_MIN_COVERAGE)
    report = check_one(cls(), cls.Params(**params, skip=["lm_head", "*.dt_proj"]), "jamba", tmp_path / "skipped",
                       checks.DEFAULT_MIN_COVERAGE, reload=False)
    assert report["fake_vs_converted"]["max_abs_diff"] == 0.0 and report["coverage"]["passed"]


def test_a_linear_subclass_with_its_own_product_is_refused_and_one_computing_a_linear_is_taken(tmp_path):
    """A Linear subclass whose forward computes a grouped product (DeepSeek-V4's ``o_a_proj``) would be
    swapped for a fake-quantized plain Linear; one that computes x·Wᵀ itself (Falcon's) is a Linear."""
    from torch import nn

    from qcompare.sdk import QcompareError, check_read_in_forward, find_targets

    class Grouped(nn.Linear):  # two groups of output rows, each over its half of the input
        def forward(self, x):
            a, b = x.chunk(2, -1)
            w = self.weight.view(2, -1, self.in_features)
            return torch.cat([a @ w[0, :, : a.shape[-1]].T, b @ w[1, :, a.shape[-1]:].T], -1)

    class Plain(nn.Linear):  # Falcon's: two roundings where F.linear's addmm makes one
        def forward(self, x):
            return x @ self.weight.T + self.bias if self.bias is not None else x @ self.weight.T

    for dtype in (torch.float32, torch.bfloat16):  # a GPU student in bfloat16 is a Linear too
        model = tiny_model("qwen3").to(dtype)
        model.model.layers[0].mlp.up_proj.__class__ = Plain
        model.model.layers[0].mlp.up_proj.bias = nn.Parameter(torch.randn(model.model.layers[0].mlp.up_proj.out_features,
                                                                          dtype=dtype))
        check_read_in_forward(model, find_targets(model, ["lm_head"]), "torchao")
    targets = find_targets(model, ["lm_head"])
    model.model.layers[1].self_attn.o_proj.__class__ = Grouped
    with pytest.raises(QcompareError, match=r"^torchao: Grouped \(model\.layers\.1\.self_attn\.o_proj\) computes its own "
                                            r"product.*add \"\*\.1\.self_attn\.o_proj\" to skip"):  # layer 0's is a plain Linear
        check_read_in_forward(model, targets, "torchao")


@pytest.mark.parametrize("family, name, says", [
    ("gemma4_text", "gptq", r"llm-compressor's calibration gathered no statistics for model\.per_layer_model_projection, "
                            r"so it cannot round it — add \"\*\.per_layer_model_projection\" to skip"),
    ("jetmoe", "gptq", r"JetMoeParallelExperts \(model\.layers\.0\.mlp\.input_linear\) keeps its experts in a layout "
                       r"llm-compressor does not split.*skip = \[\"lm_head\", \"\*\.input_linear\", \"\*\.output_linear\"\]"),
    ("minimax_m3_vl_text", "gptq", r"llm-compressor's split of MiniMaxM3VLExperts into one Linear per expert fails "
                                   r"\(AttributeError: .*swiglu_alpha'\); the torchao quantizer"),
    ("inkling_text", "awq", r"smoothing of model\.layers\.0\.post_attention_layernorm would change what "
                            r"model\.layers\.0\.mlp\.shared_experts computes.*InklingSharedExperts holds no 2-D weight"),
    ("glm_moe_dsa", "awq", r"would change what model\.layers\.0\.self_attn\.indexer\.wq_b computes.*it lies outside "
                           r"model\.layers\.0\.self_attn\.q_b_proj, the module llm-compressor reruns"),
])
def test_what_llm_compressor_would_get_wrong_is_refused_in_one_line_before_calibration(tmp_path, family, name, says):
    """GPTQ and AWQ on layouts llm-compressor mishandles: a Linear no calibration input reaches (oneshot crashed
    with "No statistics available"), experts it does not split (they stayed float: coverage 12%), a split that
    runs another function (it crashed mid-calibration), and AWQ readers it cannot balance (the smoothed model
    moved by 9-19% and the cell failed after calibrating)."""
    from qcompare.sdk import QcompareError, checks, get_registry
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", name)
    with pytest.raises(QcompareError, match=f"^{name}: .*{says}") as e:
        check_one(cls(), cls.Params(bits=4, group_size=16, **QUICK_CALIBRATION), family, tmp_path,
                  checks.DEFAULT_MIN_COVERAGE)
    assert not isinstance(e.value, checks.CheckFailed) and "\n" not in str(e.value)


def test_per_expert_checkpoints_reload_exactly_where_transformers_has_no_converter_and_a_shared_expert_stays_apart(
        tmp_path):
    """Inkling and MiniMax-M3's text model have no converter from one Linear per expert to their fused experts:
    qcompare.compat registers one. Inkling's float shared experts hold 3-D weights named like experts
    (``shared_experts.down_proj``); an unanchored pattern saved them under per-expert names and the reload
    computed another shared expert (logits 3e-4 apart, the experts' outputs wholly different)."""
    from qcompare.sdk import checks, get_registry
    from qcompare.testing import check_one

    cls = get_registry().get("quantizer", "torchao")
    reports = [check_one(cls(), cls.Params(bits=4, group_size=16), family, tmp_path / family,
                         checks.DEFAULT_MIN_COVERAGE, reload=False) for family in ("inkling_text", "minimax_m3_vl_text")]
    results = checks.reload_all([(r["saved"], r["fingerprint"]) for r in reports], checks.dtype_tolerance("torch.float32"))
    assert [r["max_abs_diff"] for r in results] == [0.0, 0.0], results


def test_a_compressed_export_whose_family_initialises_a_compressed_layer_loads_and_its_card_says_how(tmp_path):
    """GPTBigCode's ``_init_weights`` draws ``c_proj.weight``, which a compressed Linear no longer has: its GPTQ
    folder did not load at all. The model's own initialisation, run on its meta model with the quantized
    layers' weights taken away, tells which checkpoints need ``qcompare.compat``; the families that do not
    read one keep cards without it."""
    from qcompare.compat_scope import init_reads_compressed_weights, needed_by
    from qcompare.sdk import checks, get_registry
    from qcompare.testing import check_one, tiny_config

    cls = get_registry().get("quantizer", "gptq")
    report = check_one(cls(), cls.Params(bits=4, group_size=16, **QUICK_CALIBRATION), "gpt_bigcode", tmp_path,
                       checks.DEFAULT_MIN_COVERAGE)
    assert report["reload"]["max_abs_diff"] == 0.0
    assert needed_by(json.loads((tmp_path / "saved" / "config.json").read_text()))
    for family, reads in (("gpt_bigcode", True), ("qwen3", False), ("mixtral", False), ("qwen3_next", False)):
        packed = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"]}
        config = {**tiny_config(family).to_dict(), "quantization_config": packed}
        assert init_reads_compressed_weights(config) == reads, family
        # int- and float-quantized layers keep their .weight: nothing to read that is not there
        config["quantization_config"] = {**packed, "format": "float-quantized"}
        assert not init_reads_compressed_weights(config), family
