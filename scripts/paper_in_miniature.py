"""Regenerate docs/paper-in-miniature.md: the founding study's findings beside its toy twins' results.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/paper_in_miniature.py --run    # runs the twins first (~11 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/paper_in_miniature.py          # from runs/toy_paper_* as they are

--run runs each twin of recipes/toy/paper/ that the document uses (λ, learning rate, steps, batch ×
rollout, β) into runs/toy_paper_<study> with `qcompare run` (finished cells are kept, so an
interrupted run resumes), then writes the page from those run folders (qcompare.study.miniature).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from qcompare.study.miniature import STUDIES, findings, markdown

ROOT = Path(__file__).resolve().parent.parent


def run_twins(runs: Path, workers: int) -> None:
    for study in STUDIES:
        recipe = ROOT / "recipes" / "toy" / "paper" / f"{study}.toml"
        print(f"running {recipe.relative_to(ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "qcompare", "run", str(recipe), "-o", str(runs / f"toy_paper_{study}"),
                        "--set", f"executor.workers={workers}"], check=True)


def wall_minutes(runs: Path) -> float:
    """First cell's start to last cell's finish, summed over the twins' run folders."""
    from qcompare.results.store import open_run

    total = 0.0
    for study in STUDIES:
        folder = runs / f"toy_paper_{study}"
        if not (folder / "cells").is_dir():
            continue
        records = [r for r in open_run(folder).records() if r.started_at and r.finished_at]
        if records:
            start = min(datetime.fromisoformat(r.started_at) for r in records)
            total += (max(datetime.fromisoformat(r.finished_at) for r in records) - start).total_seconds()
    return total / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="the folder holding runs/toy_paper_<study>")
    parser.add_argument("--run", action="store_true", help="run (or resume) the twins first")
    parser.add_argument("--workers", type=int, default=2, help="cells at once when running the twins")
    parser.add_argument("--margin", type=float, default=0.005,
                        help="equivalence margin of the verdicts (default half a point: the study's λ spread was 0.3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "paper-in-miniature.md")
    args = parser.parse_args()
    if args.run:
        run_twins(args.runs, args.workers)
    found, missing = findings(args.runs, args.margin)
    if not found:
        sys.exit(f"no twin run under {args.runs} (toy_paper_<study> for {', '.join(STUDIES)}); give --run")
    header = [
        "The founding study (Qwen3-4B-Instruct-2507, torchao INT4 + LoRA, GKD on tulu-3, five lm-eval tasks) "
        "run in miniature on the toy world: the twins in `recipes/toy/paper/` sweep the same axes on "
        "`toy-qwen3` at torchao INT3 per channel — the toy's counterpart of the study's INT4 regime (PTQ costs a "
        "few points, training reaches a ceiling) — 2 seeds each, evaluated on `toy` (what the `toy-chat` "
        "distillation data covers), `toy_uncovered` (pets and subtraction, held only by the teacher's "
        "pretraining: the part HellaSwag, ARC and MMLU play for a student distilled on general chat data) and "
        "`toy_gen`.",
        "",
        "Each verdict below is decided from the twin's numbers by the rule printed with it, with the report's "
        f"comparisons (seeds and items both resampled, equivalence margin ±{args.margin:g}; the study's λ averages span "
        "0.003); `±` is a 95% interval over "
        "seeds, `=` marks seeds that agreed exactly. A finding the toy world does not reproduce is reported as "
        "such, with the reason.",
        "",
        "Regenerate: `OMP_NUM_THREADS=1 .venv/bin/python scripts/paper_in_miniature.py --run` (the runs behind "
        f"this page took {wall_minutes(args.runs):.0f} minutes from each twin's first cell to its last).",
        "",
    ]
    args.out.write_text(markdown(found, missing, header))
    print(f"wrote {args.out}" + (f"; not run yet: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
