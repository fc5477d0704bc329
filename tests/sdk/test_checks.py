"""Every cell proves what it reports: fake ≡ converted, coverage, true size, reload, provenance.

The checks run in the runner for every quantizer; ``qcompare.testing.check_quantizer`` runs the
same functions for a plugin author. These tests run them on the registry's quantizers, and on
third-party quantizers written wrong on purpose."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qcompare import hookimpl
from qcompare.cli import app
from qcompare.sdk.registry import add_plugin, get_registry, remove_plugin
from qcompare.testing import check_quantizer

cli = CliRunner()
import qcompare_rtn  # noqa: E402  the example plugin, as a third party writes it (pyproject's pythonpath)
import qcompare_rtn.grids  # noqa: E402
from unsavable import UnsavableRTN  # noqa: E402

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

QUICK = {"gptq": {"calibration_samples": 16, "calibration_length": 64},
         "awq": {"calibration_samples": 16, "calibration_length": 64}}


def quantizers():
    """Every quantizer in the registry, and the example plugin's."""
    found = [(name, get_registry().get("quantizer", name)) for name in get_registry().names("quantizer")]
    return found + [("rtn (example)", qcompare_rtn.RTNQuantizer)]


@pytest.mark.parametrize("name,cls", quantizers(), ids=[n for n, _ in quantizers()])
def test_every_quantizer_passes_the_runners_checks_on_dense_layouts(name, cls, tmp_path):
    report = check_quantizer(cls, QUICK.get(name), layouts=("gqa", "fused-qkv", "tied-embeddings"), folder=tmp_path)
    for layout, r in report.items():
        assert r["fake_vs_converted"]["passed"] and r["reload"]["passed"], layout
        assert r["coverage"]["body"] >= 0.95 and r["size"]["bits_per_weight"] < 16


# --- third-party quantizers written wrong ----------------------------------------------------


class OffGridRTN(qcompare_rtn.RTNQuantizer):
    """Converts on another grid than the one it trained on: scales from max/(qmax + 0.5)."""

    name = "offgrid"

    def convert(self, student, params, context):
        model = super().convert(student, params, context)
        for m in model.modules():
            if isinstance(m, qcompare_rtn.grids.RTNLinear):
                m.scale.mul_(1 + 0.5 / (2 ** (params.bits - 1) - 1))
        return model


class DefaultSaveRTN(qcompare_rtn.RTNQuantizer):
    """Keeps the base class's save: plain save_pretrained of modules transformers does not know."""

    name = "plainsave"
    save = qcompare_rtn.RTNQuantizer.__mro__[1].save  # qcompare.sdk.api.Quantizer.save


class RoundedRTN(qcompare_rtn.RTNQuantizer):
    """Rounds without a straight-through gradient: torch.round's gradient is zero."""

    name = "nograd"

    def prepare(self, model, params, context):
        from torch.nn.utils import parametrize

        class Round(torch.nn.Module):
            def forward(self, w):
                codes, scale = qcompare_rtn.grids.quantize_groups(w, params.bits, params.group_size)
                return (codes * scale).reshape(w.shape)

        for _, m in qcompare_rtn.grids.targets(model, params):
            parametrize.register_parametrization(m, "weight", Round())
        return model


class OutputGroupsRTN(qcompare_rtn.RTNQuantizer):
    """Rounds each weight in groups along its output features (a column of the (out, in) matrix): a
    grid on the wrong axis, which fake ≡ converted would not see where convert does the same."""

    name = "outgroups"

    def prepare(self, model, params, context):
        from torch.nn.utils import parametrize

        class ByColumns(torch.nn.Module):
            def forward(self, w):
                return qcompare_rtn.grids.fake_quantize(w.t().contiguous(), params.bits, params.group_size).t()

        for _, m in qcompare_rtn.grids.targets(model, params):
            parametrize.register_parametrization(m, "weight", ByColumns())
        return model


class Wrong:
    @hookimpl
    def register_quantizers(self, register):
        register(OutputGroupsRTN)
        register(OffGridRTN)
        register(DefaultSaveRTN)
        register(RoundedRTN)
        register(FrozenRTN)


@pytest.fixture
def wrong_plugins(test_plugins):
    plugin = Wrong()
    add_plugin(plugin)
    yield
    remove_plugin(plugin)


RECIPE = """
name = "checked"
models = ["{{model}}"]
seeds = [0]
teacher = false
{extra}
[[quantizers]]
name = "{quantizer}"
bits = {bits}
group_size = 16
{qextra}
[[distillers]]
name = "nudge"
max_steps = 2
[[evaluators]]
name = "probe"
"""


def run_recipe(write_recipe, tmp_path, quantizer, bits=4, extra="", qextra=""):
    recipe = write_recipe(RECIPE.format(quantizer=quantizer, bits=bits, extra=extra, qextra=qextra))
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    records = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/result.json"))]
    return res, out, records


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_convert_off_its_training_grid_fails_the_cell_with_one_line(wrong_plugins, write_recipe, tmp_path, bits):
    res, _, [record] = run_recipe(write_recipe, tmp_path, "offgrid", bits=bits)
    assert res.exit_code == 1
    assert record["status"] == "failed" and "metrics" not in record
    assert record["error"].startswith("fake ≡ converted failed: the converted model's logits differ")
    assert "\n" not in record["error"]
    check = record["checks"]["fake_vs_converted"]
    assert not check["passed"] and check["max_abs_diff"] > check["tolerance"]


def test_groups_along_the_output_features_fail_the_cell_with_one_line(wrong_plugins, write_recipe, tmp_path):
    # 2 bits: 4 levels, which a group of 16 may exceed (at 4 bits, a group of 16 cannot tell: undecidable)
    res, _, [record] = run_recipe(write_recipe, tmp_path, "outgroups", bits=2)
    assert res.exit_code == 1 and record["status"] == "failed" and "metrics" not in record
    assert record["error"].startswith("grid: the quantizer's groups do not run along the input features: model.layers.")
    assert "\n" not in record["error"] and "where a grid of 4 levels with one scale per group holds at most 4" in record["error"]
    check = record["checks"]["grid"]
    assert not check["passed"] and check["levels"] == 4 and max(check["across_groups"].values()) > 4


def test_a_default_save_that_reloads_as_another_model_is_refused(wrong_plugins, write_recipe, tmp_path):
    res, out, [record] = run_recipe(write_recipe, tmp_path, "plainsave", extra="save_models = true")
    # the evaluation stands (fake ≡ converted held), the model that would reload at random is not kept
    assert res.exit_code == 1 and record["status"] == "done"
    assert record["save_error"].startswith("reload: the saved folder loads as a different model")
    assert not (out / "cells" / record["id"] / "model").exists()
    # export rebuilds it and refuses it the same way: exit 1, one line, no folder
    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert res.exit_code == 1, res.output
    [line] = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert "reload: the saved folder loads as a different model" in line
    assert not to.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_example_quantizer_exports_a_folder_that_reloads_identically(test_plugins, write_recipe, tmp_path):
    res, out, [record] = run_recipe(write_recipe, tmp_path, "rtn", extra="save_models = true")
    assert res.exit_code == 0, res.output
    assert record["checks"]["reload"]["passed"] and record["checks"]["reload"]["max_abs_diff"] == 0.0
    config = json.loads((out / "cells" / record["id"] / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert res.exit_code == 0, res.output
    card = (to / "README.md").read_text()
    assert "## Checks" in card and '"reload"' not in card and "- reload: {" in card


# --- coverage and true size ------------------------------------------------------------------


def test_a_quantizer_that_leaves_the_body_float_is_refused_before_running_unless_the_recipe_allows_it(
        test_plugins, write_recipe, tmp_path):
    skip = 'skip = ["lm_head", "*.mlp.*"]'
    res, _, records = run_recipe(write_recipe, tmp_path, "rtn", qextra=skip)
    # the coverage check after convert would fail every cell: run says so before training any
    assert res.exit_code == 2 and records == [], res.output
    [line] = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert "quantizer rtn on" in line and "coverage: at most" in line and "out of reach: Linear: " in line
    assert "minimum 95%" in line and "min_coverage" in line
    share = int(line.split("coverage: at most ")[1].split("%")[0]) / 100
    assert 0.2 < share < 0.6
    # the study may want exactly that: the recipe says so, and the record keeps what was measured
    res, _, [record] = run_recipe(write_recipe, tmp_path / "allowed", "rtn", qextra=skip + "\nmin_coverage = 0.2")
    assert res.exit_code == 0, res.output
    # what validate foresaw is what the coverage check measures after convert
    assert record["checks"]["coverage"]["body"] == pytest.approx(share, abs=0.005)
    assert record["checks"]["coverage"]["minimum"] == 0.2
    assert record["size"]["quantized_share_body"] == pytest.approx(record["checks"]["coverage"]["body"])


def test_min_coverage_is_checked_and_changes_no_cell_id(test_plugins, write_recipe):
    from qcompare.engine.cells import expand
    from qcompare.engine.recipe import load_recipe

    bad = write_recipe(RECIPE.format(quantizer="rtn", bits=4, extra="", qextra="min_coverage = 1.5"), "bad.toml")
    res = cli.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "min_coverage: bad value 1.5" in res.output
    ids = [{c.id for c in expand(load_recipe(write_recipe(RECIPE.format(quantizer="rtn", bits=4, extra="", qextra=q),
                                                          f"r{i}.toml")))} for i, q in enumerate(("", "min_coverage = 0.5"))]
    assert ids[0] == ids[1]


def test_true_sizes_tell_bit_widths_apart_and_nominal_stays_apart(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE.format(quantizer="rtn", bits="[2, 4, 8]", extra="", qextra="")
                          .replace("teacher = false", "teacher = true"))
    res = cli.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    records = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("cells/*/result.json")]
    teacher = next(r for r in records if r["settings"]["quantizer"] is None)
    assert teacher["size"]["model_bits_per_weight"] == 32 and teacher["size"]["bits_per_weight"] is None
    by_bits = {r["settings"]["quantizer"]["params"]["bits"]: r["size"] for r in records if r["settings"]["quantizer"]}
    for bits, size in by_bits.items():
        # RTN holds one int8 per code and one fp32 scale per group of 16; it ships codes at `bits`
        assert size["bits_per_weight"] == pytest.approx(bits + 32 / 16)
        assert size["memory_bits_per_weight"] == pytest.approx(8 + 32 / 16)
        assert size["nominal_bits"] == pytest.approx(bits + 32 / 16)
    assert by_bits[2]["packed_bytes"] < by_bits[4]["packed_bytes"] < by_bits[8]["packed_bytes"]
    assert by_bits[2]["memory_bytes"] == by_bits[8]["memory_bytes"]  # one byte per code in memory either way
    assert 2 < by_bits[2]["model_bits_per_weight"] < 32
    res = cli.invoke(app, ["report", str(tmp_path / "run"), "--format", "csv"])
    header = res.output.splitlines()[0].split(",")
    assert {"quantized", "bits/weight", "model bits", "nominal bits", "MB"} <= set(header)


# --- qcompare.testing holds a plugin to what the runner needs ------------------------------------


class DequantizedSaveRTN(qcompare_rtn.RTNQuantizer):
    """Saves its layers dequantized to float: reloads to the same logits, ships the float model's size."""

    name = "dequantized"

    def save(self, model, params, folder, context):
        import copy

        plain = copy.deepcopy(model)
        for name, m in list(plain.named_modules()):
            if isinstance(m, qcompare_rtn.grids.RTNLinear):
                linear = torch.nn.Linear(m.shape[1], m.shape[0], bias=m.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_((m.codes.to(m.scale.dtype) * m.scale).reshape(m.shape))
                plain.set_submodule(name, linear)
        plain.save_pretrained(folder)


class FrozenRTN(qcompare_rtn.RTNQuantizer):
    """Freezes the weights it quantizes: a distiller would train norms, embeddings and head only."""

    name = "frozen"

    def prepare(self, model, params, context):
        student = super().prepare(model, params, context)
        for _, m in qcompare_rtn.grids.targets(student, params):
            m.parametrizations.weight.original.requires_grad_(False)
        return student


def test_a_declared_cannot_save_is_tested_as_such_and_an_undeclared_one_fails():
    report = check_quantizer(UnsavableRTN, {"group_size": 32}, layouts=("gqa",), saves=False)
    assert report["gqa"]["save"]["refused"] == "unsavable: this variant has no on-disk format"
    assert report["gqa"]["fake_vs_converted"]["passed"] and report["gqa"]["coverage"]["passed"]  # checked all the same
    with pytest.raises(AssertionError, match=r"save refused \(unsavable: .*\); pass saves=False"):
        check_quantizer(UnsavableRTN, {"group_size": 32}, layouts=("gqa",))
    with pytest.raises(AssertionError, match="saves=False declares that it cannot be saved"):
        check_quantizer(qcompare_rtn.RTNQuantizer, {"group_size": 32}, layouts=("gqa",), saves=False)


def test_a_folder_shipping_more_than_the_true_size_fails_the_helper():
    with pytest.raises(AssertionError, match=r"saved size: the folder ships [\d,]+ bytes of tensors, [\d.]+× the "
                                             r"converted model's true size .* ships more than the model holds"):
        check_quantizer(DequantizedSaveRTN, {"group_size": 32}, layouts=("gqa",))


@pytest.mark.parametrize("cls, why", [(FrozenRTN, "are frozen"), (RoundedRTN, "never received a gradient")])
def test_quantized_weights_that_training_cannot_reach_fail_the_helper_as_they_fail_a_cell(cls, why):
    with pytest.raises(AssertionError, match=rf"training: 14 of 14 layers of the body {why}.* "
                                             r"\(e\.g\. model\.layers\.0\.self_attn\.q_proj\)"):
        check_quantizer(cls, {"group_size": 32}, layouts=("gqa",))


@pytest.mark.parametrize("quantizer, why", [("nograd", "never received a gradient on 50% of their weights"),
                                           ("frozen", "are frozen")])
def test_a_trained_cell_whose_training_cannot_reach_the_quantized_weights_fails(wrong_plugins, write_recipe, tmp_path,
                                                                                quantizer, why):
    res, _, [record] = run_recipe(write_recipe, tmp_path, quantizer)
    assert res.exit_code == 1 and record["status"] == "failed"
    assert record["error"].startswith("training: 14 of 14 layers of the body") and why in record["error"]
    assert "model.layers.0.self_attn.q_proj" in record["error"] and record["checks"]["training"]["passed"] is False


class OneFloatRTN(qcompare_rtn.RTNQuantizer):
    """Leaves layer 0's key projection in float without saying so: 3% of the body, under any share."""

    name = "onefloat"

    def prepare(self, model, params, context):
        return super().prepare(model, self.quietly(params), context)

    def convert(self, student, params, context):
        return super().convert(student, self.quietly(params), context)

    @staticmethod
    def quietly(params):
        return params.model_copy(update={"skip": [*params.skip, "layers.0.self_attn.k_proj"]})


class BulkySaveRTN(qcompare_rtn.RTNQuantizer):
    """Saves the dequantized float model: it reloads to the same logits and ships 32 bits a weight."""

    name = "bulky"
    save = DequantizedSaveRTN.save


@pytest.fixture
def size_plugins(test_plugins):
    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register(OneFloatRTN)
            register(BulkySaveRTN)

    plugin = Plugin()
    add_plugin(plugin)
    yield
    remove_plugin(plugin)


def test_one_linear_left_float_fails_coverage_by_name_unless_skip_names_it(size_plugins, write_recipe, tmp_path):
    res, _, [record] = run_recipe(write_recipe, tmp_path, "onefloat")
    assert res.exit_code == 1 and record["checks"]["coverage"]["body"] > 0.95  # the share alone passed
    assert record["error"] == ("coverage: 1 Linear-like weights of the body stayed float that neither the recipe's "
                               "skip nor the quantizer names: model.layers.0.self_attn.k_proj.weight — quantize them, "
                               "or add them to skip")
    res, _, [record] = run_recipe(write_recipe, tmp_path / "named", "onefloat",
                                  qextra='skip = ["lm_head", "layers.0.self_attn.k_proj"]')
    assert res.exit_code == 0 and record["checks"]["coverage"]["left_in_float"] == []


def test_a_saved_folder_larger_than_the_true_size_is_kept_and_said(size_plugins, write_recipe, tmp_path):
    res, out, [record] = run_recipe(write_recipe, tmp_path, "bulky", extra="save_models = true")
    assert record["status"] == "done" and "save_error" not in record  # it loads as the evaluated model
    shipped = record["checks"]["saved_size"]
    assert shipped["passed"] is False and shipped["saved_bytes"] > 2 * shipped["true_bytes"]
    assert "ships more than the model holds" in record["notes"]["saved_size"]
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(tmp_path / "exported")])
    assert res.exit_code == 0, res.output
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "the folder does not ship the model at its true size" in card
