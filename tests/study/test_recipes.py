"""Every shipped recipe validates, and every study's toy twin runs end to end on a CPU."""

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qcompare.cli import app
from qcompare.engine.recipe import load_recipe

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
STUDIES = [RECIPES / "qwen3_int4.toml", *sorted((RECIPES / "paper").glob("*.toml"))]
cli = CliRunner()


def twin_of(study: Path) -> Path:
    return RECIPES / "toy" / study.relative_to(RECIPES)


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output


def sweep_axes(raw: dict) -> list:
    """Which plugins a recipe runs and which of their parameters it sweeps."""
    recipe = load_recipe  # noqa: F841 - the schema decides what a sweep is; mirrored here for plain lists
    axes = []
    for kind in ("quantizers", "distillers", "evaluators"):
        for table in raw.get(kind, []):
            swept = sorted(k for k, v in table.items() if isinstance(v, list) and k not in ("tasks", "skip", "ignore"))
            axes.append((kind, table["name"], swept))
    return axes


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_has_a_toy_twin_with_the_same_axes(study):
    twin = twin_of(study)
    assert twin.is_file(), f"{study} has no toy twin at {twin}"
    real, toy = tomllib.loads(study.read_text()), tomllib.loads(twin.read_text())
    assert sweep_axes(real) == sweep_axes(toy)
    assert real.get("models") and toy["models"][0].startswith("toy-qwen3")  # a toy teacher


def shrink(raw: dict) -> dict:
    """The same sweep with one seed, two-step training (no warm-up) and a few items per task (50 texts per proxy)."""
    raw["seeds"] = [0]
    for table in raw.get("distillers", []):
        if "max_steps" in table or table["name"] != "none":
            steps = table.get("max_steps", 2)
            table["max_steps"] = [1 + i for i in range(len(steps))] if isinstance(steps, list) else 2
            table.pop("warmup_ratio", None)  # a warm-up step of a one-step run would train nothing at all
    for table in raw.get("evaluators", []):
        if table["name"] == "lm_eval":
            table["limit"] = 6
        if table["name"] in ("kl_to_teacher", "perplexity"):
            table["max_samples"] = min(table.get("max_samples", 50), 50)
    for table in raw.get("quantizers", []):
        if "calibration_samples" in table:
            table["calibration_samples"] = 8
    return raw


def write_toml(raw: dict, path: Path) -> Path:
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for table in v:
                lines += [f"[[{k}]]"] + [f"{kk} = {value(vv)}" for kk, vv in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def other_architectures(tmp_path_factory):
    """Random-weight models of other families that speak the toy tokenizer."""
    from transformers import AutoTokenizer

    from qcompare.sdk.registry import get_registry
    from qcompare.testing import tiny_model

    toy = get_registry().models["toy-qwen3"].obj[0]
    tok = AutoTokenizer.from_pretrained(toy)
    folders = []
    for arch in ("llama", "mistral", "phi3"):
        folder = tmp_path_factory.mktemp(arch)
        tiny_model(arch, vocab_size=len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """One runs folder for every twin, as `qcompare run` lays them out (runs/<recipe name>)."""
    return tmp_path_factory.mktemp("runs")


def run_twin(study: Path, folder: Path, request, twin_runs: Path):
    """``qcompare run`` of a study's shrunk toy twin into ``twin_runs``; (result, its runs folder)."""
    raw = shrink(tomllib.loads(twin_of(study).read_text()))
    if study.stem == "architectures":
        raw["models"] += request.getfixturevalue("other_architectures")
    out = twin_runs / raw["name"]
    return cli.invoke(app, ["run", str(write_toml(raw, folder / f"{study.stem}.toml")), "-o", str(out)]), out


@pytest.fixture(scope="module")
def all_twins(twin_runs, request, tmp_path_factory):
    """``twin_runs`` with every twin run: the twin tests' own runs where this worker ran them, else here (a
    parallel worker may have taken some of those tests)."""
    folder = tmp_path_factory.mktemp("twins")
    for study in STUDIES:
        raw = tomllib.loads(twin_of(study).read_text())
        if not list((twin_runs / raw["name"]).glob("cells/*/result.json")):
            res, _ = run_twin(study, folder, request, twin_runs)
            assert res.exit_code == 0, res.output
    return twin_runs


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_toy_twin_runs_every_cell(study, tmp_path, request, twin_runs):
    res, out = run_twin(study, tmp_path, request, twin_runs)
    assert res.exit_code == 0, res.output
    records = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    assert len(records) == res.output.count("— done") and all(r["status"] == "done" for r in records)
    assert all(r["metrics"] for r in records)


def test_the_papers_tables_come_from_the_runs_in_one_command(all_twins, tmp_path):
    twin_runs = all_twins
    res = cli.invoke(app, ["paper", str(twin_runs), "--out", str(tmp_path / "paper"), "--margin", "0.02"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "paper" / "tables.md").read_text()
    for title in ("Main table: on-policy share λ", "Learning-rate sweep", "Short against long training",
                  "Batch size × rollout length at λ = 1", "the generalized JSD's β", "Compute: on-policy against off-policy",
                  "Quantizers and formats at ~4 bits"):
        assert title in md, title
    assert "Not run yet" not in md and "inconclusive (1 seed)" in md  # the shrunk twins ran one seed
    tex = (tmp_path / "paper" / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 7 and r"$\lambda$" in tex
    assert list((tmp_path / "paper" / "figures" / "lr_sweep").glob("*learning_rate*.png"))
    assert (tmp_path / "paper" / "figures" / "quantizers" / "metric_vs_bits.png").is_file()  # every format on one axis
    for fmt in ("nvfp4", "mxfp4", "bnb", "gptq", "awq"):
        assert f"| {fmt}" in md, fmt
    assert "KL to the teacher (toy-heldout)" in md  # where weight-only 4-bit formats part first
    # every configuration has its verdicts against torchao with the same training (untrained ones too)
    section = md.split("## Quantizers and formats")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and " · " in line]
    assert len(rows) == 6 * 4 and all("|  |" not in r and "n/a" not in r for r in rows), rows
    assert all(r.count("reference") == 2 for r in rows if r.startswith("| torchao"))


def test_the_paper_in_miniature_is_written_from_the_twins_runs(all_twins, tmp_path):
    """scripts/paper_in_miniature.py on the shrunk twins: every finding of the founding study beside
    the twin's result, with a verdict the rules decided (one seed per side here: nothing shown to
    differ), covered and uncovered knowledge apart; the shipped page is linked from the README."""
    twin_runs = all_twins
    import subprocess
    import sys

    out = tmp_path / "miniature.md"
    done = subprocess.run([sys.executable, str(RECIPES.parent / "scripts" / "paper_in_miniature.py"), "--runs",
                           str(twin_runs), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    page = out.read_text()
    from qcompare.study.miniature import STUDY, VERDICTS

    for title in ("Main table: the on-policy share λ", "Compute: on-policy against off-policy", "Learning-rate sweep",
                  "Short against long training", "Batch size × rollout length at λ = 1", "The generalized JSD's β"):
        assert f"## {title}" in page, title
    assert all(claim in page for claim in STUDY.values())
    verdicts = {line.split("**")[1].removeprefix("The twin ").rstrip("."): line
                for line in page.splitlines() if line.startswith("**The twin ")}
    assert len(page.split("**The twin ")) == 7 and set(verdicts) <= set(VERDICTS)
    # one seed per side: no verdict can show a difference, so the λ rule cannot find one either
    assert page.split("## Main table")[1].split("\n**The twin ")[1].startswith("agrees")
    assert "uncovered (toy_uncovered)" in page and "Not run yet" not in page
    shipped = RECIPES.parent / "docs" / "paper-in-miniature.md"
    assert "docs/paper-in-miniature.md" in (RECIPES.parent / "README.md").read_text()
    assert shipped.read_text().startswith("# The paper in miniature") and "toy_uncovered" in shipped.read_text()
