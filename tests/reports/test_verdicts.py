"""Verdicts a reviewer would accept: intervals with seeds and items in them that cover the truth,
equivalence a null result can rest on, the table's own statistic, items paired by id."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.reports.verdicts import Side, Structure, compare

cli = CliRunner()


def simulate(rng, seeds, items, seed_sd, item_sd, noise, difference, paired=True):
    """Scores with a known A − B: per-item effects (the items drawn), per-run shifts (the training
    runs drawn) and per-run-item noise."""
    base = rng.normal(0, 1, items)
    effect = rng.normal(0, item_sd, items)
    names = list(range(seeds))
    a = base + difference + effect + rng.normal(0, seed_sd, seeds)[:, None] + rng.normal(0, noise, (seeds, items))
    b = base + rng.normal(0, seed_sd, seeds)[:, None] + rng.normal(0, noise, (seeds, items))
    return Side(names, {"t": a}), Side(names if paired else [n + 100 for n in names], {"t": b})


@pytest.mark.parametrize("seeds,paired", [(3, True), (5, True), (3, False)])
@pytest.mark.e2e
def test_the_95_interval_covers_the_true_difference_95_percent_of_the_time(seeds, paired):
    rng = np.random.default_rng(0)
    hits, plain, draws = 0, 0, 400
    for r in range(draws):
        a, b = simulate(rng, seeds, 150, seed_sd=0.02, item_sd=0.1, noise=0.05, difference=0.01, paired=paired)
        c = compare(a, b, Structure(["t"]), draws=300, seed=r)
        hits += c.low <= 0.01 <= c.high
        plain += c.two_level[0] <= 0.01 <= c.two_level[1]
    assert 0.92 <= hits / draws <= 0.995, hits / draws
    if seeds == 3 and paired:  # why the seed level uses Student's t: the plain percentile is too narrow
        assert plain / draws < 0.9


def test_verdicts_on_built_cases():
    rng = np.random.default_rng(1)
    same = compare(*simulate(rng, 8, 400, 0.002, 0.05, 0.02, 0.0), Structure(["t"]), margin=0.02)
    assert same.verdict == "equivalent within ±0.02"
    better = compare(*simulate(rng, 5, 400, 0.002, 0.05, 0.02, 0.08), Structure(["t"]), margin=0.02)
    assert better.verdict == "A better" and better.low > 0
    worse = compare(*simulate(rng, 5, 400, 0.002, 0.05, 0.02, -0.08), Structure(["t"]))
    assert worse.verdict == "B better"
    noisy = compare(*simulate(rng, 2, 400, 0.05, 0.05, 0.02, 0.02), Structure(["t"]), margin=0.01)
    assert noisy.verdict.startswith("inconclusive — about ") and "seeds per side would settle it" in noisy.verdict
    assert noisy.seeds_needed() > 2
    # the hint uses the interval's own t quantile at n seeds: a run inconclusive at its seeds never
    # hears that as many would settle it (a normal quantile said "about 2" to a 2-seed run)
    hinted = []
    for r in range(20):
        c = compare(*simulate(np.random.default_rng(100 + r), 2, 400, 0.01, 0.05, 0.02, 0.03), Structure(["t"]),
                    margin=0.02, draws=200)
        if c.verdict.startswith("inconclusive") and c.seeds_needed() is not None:
            hinted.append(c.seeds_needed())
    assert len(hinted) >= 5 and min(hinted) > 2, hinted
    # one trained run per side: items alone never make a difference claim
    a, b = simulate(rng, 1, 400, 0.0, 0.05, 0.02, 0.2)
    lone = compare(a, b, Structure(["t"]))
    assert lone.verdict.startswith("inconclusive — one seed per side: training variance is unknown")
    # nothing trained on either side (post-training quantization): no training variance to know
    a.trained = b.trained = False
    assert compare(a, b, Structure(["t"])).verdict == "A better"
    # a metric where lower is better (KL, perplexity): the difference stays A − B, as printed;
    # the verdict reads it the metric's way
    higher_kl = compare(*simulate(rng, 5, 400, 0.002, 0.05, 0.02, 0.08), Structure(["t"], lower_is_better=True))
    assert higher_kl.difference > 0 and higher_kl.low > 0 and higher_kl.verdict == "B better"


def test_a_group_is_weighted_as_lm_eval_weights_it_and_ratio_metrics_by_their_weights():
    small, large = np.array([[1.0, 1.0]]), np.zeros((1, 8))  # A: right on the 2 items of one subtask
    a = Side(["—"], {"s": small, "l": large}, trained=False)
    b = Side(["—"], {"s": small * 0, "l": large}, trained=False)
    equal = compare(a, b, Structure(["g"], {"g": ["s", "l"]}, {"g": "equal"}), draws=50)
    size = compare(a, b, Structure(["g"], {"g": ["s", "l"]}, {"g": "size"}), draws=50)
    assert equal.difference == pytest.approx(0.5) and size.difference == pytest.approx(0.2)
    kl_a = Side(["—"], {"d": np.array([[1.0, 3.0]])}, {"d": np.array([[3.0, 1.0]])}, trained=False)
    kl_b = Side(["—"], {"d": np.array([[0.0, 0.0]])}, {"d": np.array([[3.0, 1.0]])}, trained=False)
    assert compare(kl_a, kl_b, Structure(["d"]), draws=50).difference == pytest.approx((3 + 3) / 4)


@pytest.fixture
def seeded_run(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "distillers[1].max_steps=[1,3]",
                           "--set", "evaluators[0].sequences=24", "--set", "seeds=[0,1,2]"])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.e2e
def test_selectors_take_one_configuration_and_name_what_else_they_match(seeded_run):
    res = cli.invoke(app, ["report", str(seeded_run), "--compare", "bits=2,distiller=nudge", "bits=8,distiller=nudge"])
    assert res.exit_code == 2 and "matches cells of 2 configurations that differ in distiller.max_steps (1, 3)" in res.output
    res = cli.invoke(app, ["report", str(seeded_run), "--compare", "bits=2,max_steps=3", "bits=2,max_steps=1",
                           "--margin", "0.5"])
    assert res.exit_code == 0, res.output
    assert "3 vs 3 seeds, paired" in res.output and "(margin ±0.5)" in res.output and "→ " in res.output
    pooled = cli.invoke(app, ["report", str(seeded_run), "--compare", "bits=2,distiller=nudge", "bits=8,distiller=nudge",
                              "--pool"])
    assert pooled.exit_code == 0 and "2 configurations pooled (--pool)" in pooled.output


@pytest.mark.e2e
def test_items_pair_by_id_through_reordered_and_edited_task_files(seeded_run):
    from qcompare.reports.compare import compare as compare_cells
    from qcompare.results.frame import load_run

    args = ("bits=2,max_steps=3", "bits=2,max_steps=1")
    before, *_ = compare_cells(seeded_run, *args)
    df = load_run(seeded_run)
    cell = df[(df["quantizer.bits"] == 2) & (df["distiller.max_steps"] == 3) & (df["seed"] == 0)]["id"].iloc[0]
    path = seeded_run / "cells" / cell / "items.json"
    raw = json.loads(path.read_text())
    probe = raw["tasks"]["probe"]
    order = list(reversed(range(len(probe["ids"]))))  # the same items, another order
    probe["ids"] = [probe["ids"][i] for i in order]
    probe["metrics"] = {k: [v[i] for i in order] for k, v in probe["metrics"].items()}
    path.write_text(json.dumps(raw))
    reordered, *_ = compare_cells(seeded_run, *args)
    assert reordered.difference == pytest.approx(before.difference) and reordered.items == before.items
    probe["ids"][0] = "seq-edited"  # an item that is not the same item any more
    path.write_text(json.dumps(raw))
    edited, _, _, _, notes = compare_cells(seeded_run, *args)
    assert edited.items == before.items - 1
    assert any("items differ between cells" in n and cell in n for n in notes)


@pytest.mark.e2e
def test_pivot_cells_hold_one_configuration_or_say_what_they_folded(seeded_run):
    res = cli.invoke(app, ["report", str(seeded_run), "--rows", "bits", "--cols", "distiller", "--metric", "probe/acc"])
    assert res.exit_code == 0, res.output
    assert "differ in distiller.max_steps (1, 3)" in res.output and "chosen on probe/acc itself: optimistic" in res.output
    res = cli.invoke(app, ["report", str(seeded_run), "--rows", "bits", "--cols", "max_steps", "--metric", "probe/acc"])
    assert res.exit_code == 0 and "several configurations" not in res.output


@pytest.mark.e2e
def test_the_table_says_what_its_intervals_are_over_and_shows_training_that_hurt(seeded_run):
    from qcompare.reports.tables import summarize
    from qcompare.results.frame import load_run

    summary, _ = summarize(load_run(seeded_run))
    distilled = summary[summary["kind"] == "distilled"]
    assert set(distilled["average over"]) <= {"seeds", "seeds agree"} and (distilled["seeds"] == 3).all()
    assert distilled["Δ PTQ"].notna().all()
    res = cli.invoke(app, ["report", str(seeded_run)])
    assert "± over" in res.output and "t, 3 seeds" in res.output and "Δ PTQ" in res.output


@pytest.mark.e2e
def test_the_comparison_is_the_tables_own_difference_with_groups_weighted_as_lm_eval(tmp_path):
    from qcompare.reports.compare import compare as compare_cells
    from qcompare.reports.tables import summarize
    from qcompare.results.frame import load_run

    recipe = tmp_path / "r.toml"
    recipe.write_text("""
name = "group"
models = ["toy-qwen3"]
teacher = false
[[quantizers]]
name = "torchao"
bits = [8, 2]
group_size = 0
[[distillers]]
name = "none"
[[evaluators]]
name = "lm_eval"
tasks = ["toy"]
limit = 150
""")
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(recipe), "-o", str(out)]).exit_code == 0
    df = load_run(out)
    assert df.attrs["group_weighting"] == {"toy": "equal"}
    summary, _ = summarize(df)
    table = summary.set_index("quantizer.bits")["average"]
    result, *_ = compare_cells(out, "bits=8", "bits=2")
    # the group is the mean of its four subtasks (not their items pooled: 150, 150, 125 and 61 items)
    assert result.difference == pytest.approx(table[8] - table[2], abs=1e-9)
    assert result.items == 150 + 150 + 125 + 61 and result.verdict == "A better"
