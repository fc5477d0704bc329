"""Write every number README.md quotes from the demo, from a run of the demo's records.

    .venv/bin/python scripts/readme_numbers.py                        # from the shipped reference run
    .venv/bin/python scripts/readme_numbers.py --from runs/toy_int4   # make that run the reference, then write
    .venv/bin/python scripts/readme_numbers.py --run                  # run the demo afresh (4–8 min on 2 cores) first

The reference run is docs/reference/toy_int4: the records `qcompare report` and `--compare` read
(recipe, each cell's settings and result, the per-item scores of the cells the README compares),
not the models or logs. README.md holds the generated text between `<!-- generated: NAME … -->`
and `<!-- end generated: NAME -->`; the sentences are templates whose words (trails or leads, the
verdict) follow the numbers. tests/test_readme_numbers.py fails when README.md and what this script
writes from the reference run differ, and re-runs two of its cells to check they come out the same.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPE = ROOT / "recipes" / "toy_int4.toml"
REFERENCE = ROOT / "docs" / "reference" / "toy_int4"
SHOWN_AS = "runs/toy_int4"  # where a user's own demo run lands, as the README's commands name it
MARGIN = 0.02
# the README's two comparisons: the λ question at INT2, and what training won over the untrained model
LAMBDA = ("bits=2,lmbda=1", "bits=2,lmbda=0")
AGAINST_PTQ = ("bits=2,lmbda=0", "bits=2,distiller=none")
ONE_CELL = "toy-qwen3 · torchao(bits=4) · gkd(lmbda=0.0) · seed 0"  # the run's printed lines, for one cell
MARKER = re.compile(r"<!-- generated: (?P<name>[\w-]+) .*?-->\n.*?<!-- end generated: (?P=name) -->", re.DOTALL)


# --- what the commands print ------------------------------------------------------------------

def command_output(args: list[str]) -> str:
    """What `qcompare ARGS` prints into a pipe or a file (qcompare.cli's console is then 200 wide)."""
    from unittest.mock import patch

    from rich.console import Console
    from typer.testing import CliRunner

    from qcompare import cli

    with patch.object(cli, "console", Console(width=200)):
        result = CliRunner().invoke(cli.app, args)
    if result.exit_code != 0:
        raise SystemExit(f"qcompare {' '.join(args)} failed:\n{result.output}")
    return result.output.rstrip("\n")


def markdown_table(run: Path) -> str:
    """`qcompare report --format markdown`, its accuracy, Δ and size columns (proxies and cost left out)."""
    from qcompare.results.frame import load_run, primary_metrics

    df = load_run(run)
    keep = ["configuration", "seeds", "± over", *primary_metrics(df.columns, df.attrs.get("groups")), "average",
            "Δ teacher", "Δ PTQ", "recovered", "bits/weight", "model bits"]
    lines = command_output(["report", str(run), "--format", "markdown"]).splitlines()
    split = lambda line: line.strip().strip("|").split("|")  # noqa: E731
    header = [c.strip() for c in split(lines[0])]
    missing = [c for c in keep if c not in header]
    if missing:
        raise SystemExit(f"the report has no column {', '.join(missing)}; update scripts/readme_numbers.py")
    idx = [header.index(c) for c in keep]
    return "\n".join("|" + "|".join(split(line)[i] for i in idx) + "|" for line in lines)


def compare_example(run: Path, a: str, b: str) -> str:
    shown = f'qcompare report {SHOWN_AS} --compare "{a}" "{b}" --margin {MARGIN:g}'
    out = command_output(["report", str(run), "--compare", a, b, "--margin", str(MARGIN)])
    return f"```console\n$ {shown}\n{out}\n```"


def run_lines(run: Path) -> str:
    """The two lines a run written to a file prints for one cell (qcompare.engine.progress)."""
    from rich.text import Text

    from qcompare.engine.progress import outcome
    from qcompare.results.store import open_run

    record = next(r for r in open_run(run).records() if r.label == ONE_CELL)
    return f"```text\nstart {record.label}\n{record.label} — {Text.from_markup(outcome(record)).plain}\n```"


# --- the sentences ----------------------------------------------------------------------------

def span(values, fmt: str) -> str:
    """``low–high`` of some numbers as the README writes them, one number if they agree."""
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low.removesuffix('%')}–{high}"


def wrap(paragraph: str) -> str:
    """A paragraph at the README's line width, code spans kept on one line."""
    whole = re.sub(r"`[^`]*`", lambda m: m[0].replace(" ", "\0"), paragraph)
    return textwrap.fill(whole, 100, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def number(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))


def timing(run: Path) -> str:
    """How long the reference run took, from its records' own times."""
    from qcompare.results.store import open_run

    records = [r for r in open_run(run).records() if r.started_at and r.finished_at]
    spans = sorted((datetime.fromisoformat(r.started_at), datetime.fromisoformat(r.finished_at)) for r in records)
    minutes = (max(end for _, end in spans) - spans[0][0]).total_seconds() / 60
    alone = all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    seconds = [r.cost["total_seconds"] for r in records]
    cpus = {r.provenance.get("cpus") for r in records}
    machine = f"a {cpus.pop()}-CPU machine" if len(cpus) == 1 else "several machines"
    rel = REFERENCE.relative_to(ROOT).as_posix()
    return (f"The numbers below are those of a reference run of the demo, shipped as its records in "
            f"[{rel}]({rel}) and written here by `scripts/readme_numbers.py`. "
            f"Its records time it at {minutes:.1f} minutes for its {len(records)} cells, run "
            f"{'one at a time' if alone else 'side by side'} on {machine} (the median cell "
            f"{statistics.median(seconds):.0f} s, the slowest {max(seconds):.0f} s: wall times, which other work on "
            "the machine lengthens); `--set executor.workers=2` runs two cells at a time. "
            f"`qcompare report {SHOWN_AS} --format markdown` gives (proxy, size and cost columns left out here):")


def bits_note(summary) -> str:
    from qcompare.results.frame import setting_text

    int4 = summary[(summary["kind"] == "ptq") & (summary["quantizer.bits"].map(setting_text) == "4")].iloc[0]
    return ("\"± over\" says what each interval is over: Student's t over the seeds, or, for a configuration run "
            "once, the items (1.96 × lm-eval's stderr: training variance unknown); `=` marks seeds that agreed "
            "exactly. bits/weight is measured in the converted model — codes at their format's width plus the "
            "scales and zero points as stored (fp32 on a CPU, so INT4 per channel is "
            f"{int4['bits/weight']:.1f}, not 4) — and model bits counts every weight, the float embeddings and "
            "head of this tiny model included (the nominal width and the packed size in MB are in the "
            "size-and-cost table).")


def int2_story(run: Path, summary, metrics: list[str]) -> str:
    """What INT2 costs and what training wins back, on what the chat data covers and on what it does not."""
    from qcompare.results.frame import setting_text

    int2 = summary[summary["quantizer.bits"].map(setting_text) == "2"]
    teacher = summary[summary["kind"] == "teacher"].iloc[0]
    ptq = int2[int2["kind"] == "ptq"].iloc[0]
    trained = int2[int2["kind"] == "distilled"]
    column = {m.partition("/")[0]: m for m in metrics}
    gap = teacher["average"] - ptq["average"]
    if gap <= 0 or trained["Δ PTQ"].min() <= 0:
        raise SystemExit("INT2 no longer costs the toy model accuracy that training wins back: the README's story "
                         "needs rewriting (scripts/readme_numbers.py, int2_story)")
    gain = lambda task: trained[column[task]] - ptq[column[task]]  # noqa: E731
    covered, uncovered = ((gain("toy") + gain("toy_gen")) / 2).mean(), gain("toy_uncovered").mean()
    ratio = uncovered / covered
    degree, than = (("far more", "than") if ratio < 0.5 else ("more", "than") if ratio < 0.83
                    else ("about as much", "as") if ratio <= 1.2 else ("less", "than"))
    moved = lambda task: (f"`{task}` {ptq[column[task]]:.3f} → "  # noqa: E731
                          f"{span(trained[column[task]], '.3f')}")
    steps = {int(s) for s in trained["distiller.max_steps"]}
    order = [d["name"] for d in tomllib.loads((run / "recipe.toml").read_text())["distillers"]]
    names = " or ".join(n.upper() for n in order if n in set(trained["distiller"]))
    training = f"{steps.pop()} steps of {names}" if len(steps) == 1 else names
    return (f"INT2 round-to-nearest costs the toy model {gap / teacher['average']:.0%} of its average "
            f"({teacher['average']:.3f} → {ptq['average']:.3f}); {training} win {span(trained['recovered'], '.0%')} "
            f"of that back — {degree} on what the chat data covers ({moved('toy')}, {moved('toy_gen')}) {than} on "
            f"what it does not ({moved('toy_uncovered')}). λ=1 against λ=0:")


def lambda_story(run: Path) -> str:
    """λ=1 against λ=0 in words that follow the comparison's numbers and verdict, then GKD against PTQ."""
    from qcompare.reports.compare import compare

    c = compare(run, *LAMBDA, margin=MARGIN)[0]
    seeds = number(min(c.seeds_a, c.seeds_b))
    said = f"λ=1 {'trails' if c.difference < 0 else 'leads'} λ=0 by {abs(c.difference):.3f} here"
    if c.verdict.startswith("equivalent"):
        said += f", and {seeds} seeds show the two equivalent within ±{MARGIN:g}"
    elif c.verdict in ("A better", "B better"):
        said += (f", and {seeds} seeds tell that from noise: the 95% interval [{c.low:+.3f}, {c.high:+.3f}] "
                 f"leaves out 0 → \"{c.verdict}\" ({'A is λ=1' if c.verdict == 'A better' else 'B is λ=0'})")
    else:
        said += (f", but {seeds} seeds cannot tell that from noise, nor show the two equivalent "
                 f"({c.verdict.partition(' — ')[2]})")
    seed_se = c.seed_sd / min(c.seeds_a, c.seeds_b) ** 0.5
    noise = f"training noise (a run's difference varies by {c.seed_sd:.3f}: {seed_se:.3f} over {seeds} seeds)"
    items = f"the {c.items:,} items (SE {c.item_se:.3f})"
    if c.item_se > 1.5 * seed_se:
        weigh = f"{items} weigh more in its uncertainty than {noise}"
    elif seed_se > 1.5 * c.item_se:
        weigh = f"{noise} weighs more in its uncertainty than {items}"
    else:
        weigh = f"{noise} and {items} weigh about the same in its uncertainty"
    p = compare(run, *AGAINST_PTQ, margin=MARGIN)[0]
    return (f"{said}; {weigh}. Against the untrained INT2 model, GKD λ=0 is "
            f"{p.difference:+.3f} [{p.low:+.3f}, {p.high:+.3f}] → \"{p.verdict}\".")


def blocks(run: Path = REFERENCE) -> dict[str, str]:
    """Each generated block of README.md, by name, from a run folder of the demo."""
    from qcompare.reports.tables import summarize
    from qcompare.results.frame import load_run

    summary, metrics = summarize(load_run(run))
    return {
        "demo-table": "\n\n".join([wrap(timing(run)), markdown_table(run), wrap(bits_note(summary))]),
        "demo-findings": "\n\n".join([wrap(int2_story(run, summary, metrics)), compare_example(run, *LAMBDA),
                                      wrap(lambda_story(run))]),
        "run-lines": run_lines(run),
    }


def splice(text: str, generated: dict[str, str]) -> str:
    """``text`` with each generated block's body replaced; every block named once, no other."""
    found = [m["name"] for m in MARKER.finditer(text)]
    if sorted(found) != sorted(generated):
        raise SystemExit(f"README.md's generated blocks are {found}; scripts/readme_numbers.py writes {list(generated)}")
    rel = REFERENCE.relative_to(ROOT).as_posix()
    return MARKER.sub(lambda m: (f"<!-- generated: {m['name']} — scripts/readme_numbers.py writes this from {rel}; "
                                 f"edit the script, not this text -->\n\n{generated[m['name']]}\n\n"
                                 f"<!-- end generated: {m['name']} -->"), text)


# --- the reference run ------------------------------------------------------------------------

def ship(run: Path, to: Path = REFERENCE) -> None:
    """Copy what the README's numbers are read from: the recipe, each cell's settings and record, and
    the files its record names (per-item scores, probe logits, training log: `qcompare report` checks
    them against the record's digests). Output logs, cost.json (the record holds it) and models stay behind."""
    from qcompare.results.store import open_run

    store = open_run(run)
    if store.recipe.read_text() != RECIPE.read_text():
        raise SystemExit(f"{run} was not run from {RECIPE.relative_to(ROOT)} as it is now (--set, or an older recipe)")
    records = list(store.records())
    if any(name.startswith("model/") for r in records for name in r.files):
        raise SystemExit(f"{run} saved its models (save_models): run the demo as the README does")
    if to.exists():
        shutil.rmtree(to)
    (to / "cells").mkdir(parents=True)
    shutil.copy2(store.recipe, to / "recipe.toml")
    for record in records:
        files = store.cell(record.id)
        (to / "cells" / record.id).mkdir()
        for name in ["settings.json", "result.json", *record.files]:
            shutil.copy2(files.folder / name, to / "cells" / record.id / name)
    (to / "README.md").write_text(
        "# The demo's reference run\n\n"
        "`qcompare run recipes/toy_int4.toml` as the README's numbers come from it, written there by\n"
        "`scripts/readme_numbers.py` (`--run` makes this folder again). Each cell keeps its `settings.json`,\n"
        "its record `result.json` and the files the record names (`items.json`, per-item scores for `--compare`;\n"
        "`probe.safetensors`; `train_log.jsonl`); output logs and `cost.json` (the record holds the cost) are\n"
        "left out. `qcompare report docs/reference/toy_int4` reads it like any run folder.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="a finished run of the demo: make it the reference")
    parser.add_argument("--run", action="store_true", help="run the demo afresh and make it the reference")
    args = parser.parse_args()
    if args.run:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, "-m", "qcompare", "run", str(RECIPE), "-o", f"{folder}/toy_int4"], check=True)
            ship(Path(folder) / "toy_int4")
    elif args.source:
        ship(args.source)
    README.write_text(splice(README.read_text(), blocks()))
    print(f"wrote {README.relative_to(ROOT)} from {REFERENCE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
