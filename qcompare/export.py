"""``qcompare export`` and ``export_best``: a finished cell as a Hugging Face model folder.

The weights come from the cell's saved ``model/`` folder (recipe option ``save_models``) or,
when the run did not keep them, from re-running the cell's phases (qcompare.engine.pipeline: same
settings, same seed), so an exported model is always the one that was evaluated. How a model
is written is qcompare.sdk.saving's; the model card is qcompare.engine.card's.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from qcompare.engine.card import model_card
from qcompare.sdk.checks import CheckFailed, Fingerprint, dtype_tolerance, reload
from qcompare.errors import QcompareError
from qcompare.results.record import CellRecord
from qcompare.results.store import RunStore, changed_files, open_run



def find_cell(store: RunStore, prefix: str) -> CellRecord:
    """The stored record of the finished, quantized cell whose id starts with ``prefix``."""
    ids = [i for i in store.cell_ids() if i.startswith(prefix)]
    if not ids:
        raise QcompareError(f"no cell id in {store.root} starts with {prefix!r}; `qcompare plan` or the report lists them")
    if len(ids) > 1:
        raise QcompareError(f"cell prefix {prefix!r} matches {len(ids)} cells ({', '.join(ids)}); give more characters")
    record = store.result(ids[0])
    if record is None or not record.done:
        status = record.status if record else "no result"
        raise QcompareError(f"cell {ids[0]} did not finish ({status}); only finished cells can be exported")
    if record.is_teacher:
        raise QcompareError(f"cell {ids[0]} is the teacher baseline (the unquantized model); export a quantized cell")
    return record


def best_cell(root: Path, metric: str, select_on: str | None = None) -> tuple[CellRecord, str]:
    """The best finished non-teacher cell: the configuration with the best mean over seeds, then its
    best seed, chosen on ``select_on`` (a validation metric apart from the reported ones) when
    given, else on ``metric`` itself. Returns the record and a line saying how it was chosen."""
    from qcompare.reports.pivots import best_configuration, lower_is_better
    from qcompare.results.frame import group_columns, load_run, metric_column

    df = load_run(root)
    df = df[df["quantizer"] != "teacher"] if not df.empty else df
    if df.empty:
        raise QcompareError(f"export_best: no finished quantized cell in {root}")
    metric_column(df, metric, "export_best metric")
    by = select_on or metric
    metric_column(df, by, "[report] select_on metric")
    group, n = best_configuration(df, group_columns(df), by)
    row = group.loc[group[by].idxmin() if lower_is_better(by) else group[by].idxmax()]
    runs = len(df)
    if select_on and select_on != metric:
        how = (f"selected on {select_on} (the recipe's [report] select_on, apart from the reported metrics): the best "
               f"of {n} configurations, then its best seed, of {runs} runs")
    else:
        how = (f"selected on {metric}, the reported metric itself: the best of {n} configurations and its best seed "
               f"among {runs} runs, so its {metric} overstates what the configuration gives (selection bias); name a "
               "validation metric in the recipe's [report] select_on to select apart from it")
    return open_run(root).result(row["id"]), how


def export_cell(run_dir: Path, cell: str, to: Path, overwrite: bool = False,
                say: Callable[[str], None] = lambda m: print(m, file=sys.stderr), selection: str | None = None) -> Path:
    """Write cell ``cell`` (an id or unique prefix) of ``run_dir`` to ``to``; return ``to``."""
    store = open_run(run_dir)
    record = find_cell(store, cell)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())) and not overwrite:
        raise QcompareError(f"{to} exists and is not empty; give a new folder (or --force to replace it)")
    saved = store.cell(record.id).model
    to.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target, replacing it only once complete: a failed or interrupted export
    # leaves no half model, and an earlier export it was to replace stays as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an exported model is meant to be shared
    probe = store.cell(record.id).probe
    evaluated = Fingerprint.load(probe) if probe.is_file() else None
    changed = [what for name, what in changed_files(store.cell(record.id).folder, record.files).items()
               if name.startswith("model/")]
    if changed:
        raise QcompareError(f"cell {record.id}: its saved model ({saved}) is not what the run wrote ("
                            f"{'; '.join(changed[:3])}); run the recipe again to recompute and save it, or delete "
                            f"{saved} and export again to rebuild it")
    try:
        try:
            if (saved / "config.json").is_file():
                shutil.copytree(saved, staging, dirs_exist_ok=True)
                rebuilt = False
                proof = prove_copy(record, staging, evaluated, say)
            else:
                seed = record.settings.seed
                why = (f"saving it failed: {record.save_error}" if record.save_error else
                       "save_models = false" if not record.files or not any(k.startswith("model/") for k in record.files)
                       else f"its folder {saved} is gone")
                say(f"the model of cell {record.id} was not saved during the run ({why}); "
                    f"rebuilding it: prepare → distill → convert{'' if seed is None else f' with seed {seed}'}")
                proof = rebuild(record, staging, say, evaluated)
                rebuilt = True
            recipe_text = store.recipe.read_text() if store.recipe.is_file() else ""
            (staging / "README.md").write_text(model_card(record, store.root.name, staging, rebuilt, recipe_text,
                                                          proof, selection))
            for path in staging.rglob("*"):  # safetensors writes its files private (0600): a model is to share
                path.chmod(0o755 if path.is_dir() else 0o644)
        except QcompareError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            kept = f"; {to} was left as it was" if to.exists() else ""
            raise QcompareError(f"exporting cell {record.id} failed ({type(e).__name__}: {first}){kept}") from e
        replace_folder(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


def replace_folder(new: Path, to: Path) -> None:
    """Put the finished folder ``new`` at ``to``: any earlier ``to`` is moved aside first and
    deleted only after ``new`` is in place (put back if that move fails)."""
    if to.is_dir() and not any(to.iterdir()):
        to.rmdir()
    if not to.exists():
        new.rename(to)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{to.name}.old.", dir=to.parent)) / to.name
    to.rename(old)
    try:
        new.rename(to)
    except BaseException:
        old.rename(to)
        raise
    shutil.rmtree(old.parent)  # the earlier export (a folder or a file) and the folder holding it


def export_best(run_dir: Path, metric: str, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Export the best cell by ``metric`` (chosen on the recipe's ``[report] select_on`` when it
    names one) to ``<run_dir>/best/`` (replacing an earlier export)."""
    from qcompare.engine.recipe import report_settings

    record, how = best_cell(Path(run_dir), metric, report_settings(Path(run_dir)).select_on)
    to = export_cell(run_dir, record.id, Path(run_dir) / "best", overwrite=True, say=say, selection=how)
    value = record.metrics.get(metric)
    say(f"exported the best cell ({record.label}{'' if value is None else f', {metric} = {value:.4f}'}; {how}) to {to}")
    return to


def prove_copy(record: CellRecord, folder: Path, evaluated: Fingerprint | None, say) -> dict:
    """Reload a copied model folder as its card says and compare it with the evaluated model."""
    if evaluated is None:
        say(f"warning: cell {record.id} was run before qcompare kept probe logits; its saved model is exported "
            "without the reload check (run the cell again to have it checked)")
        return {"reload": "not checked: the cell keeps no probe logits (made by an older qcompare)"}
    rtol = dtype_tolerance(record.size.get("dtype", "torch.float32"))
    return {"reload": reload(folder, evaluated, rtol)}


def rebuild(record: CellRecord, folder: Path, say: Callable[[str], None],
            evaluated: Fingerprint | None = None) -> dict:
    """Re-run the cell's phases (prepare → distill → convert), check the result against the evaluated
    model, save it into ``folder`` and check that the folder reloads to it; return what was checked."""
    from qcompare.sdk.api import CellContext
    from qcompare.engine.cells import Cell, data_identity
    from qcompare.engine.pipeline import CellPipeline, InputCache
    from qcompare.sdk.registry import get_registry
    from qcompare.engine.recipe import DataSpec
    from qcompare.engine.runner import pick_device

    cell = Cell.from_settings(record.settings)
    if cell.id != record.id:
        raise QcompareError(f"cell {record.id}: its stored settings no longer hash to its id; cannot rebuild it")
    # the stored settings, not the recipe file (--set overrides are not in it), decide the cell
    data = DataSpec.model_validate(record.data_source or record.settings.data or {})
    if data_identity(data) != record.settings.data:
        raise QcompareError(f"cell {record.id}: its training data {data.train!r} is missing or changed since "
                            "the run, so its model cannot be rebuilt; save_models = true keeps models")
    registry = get_registry()
    device = pick_device("auto")
    ran_on = record.cost.get("device")
    if ran_on and ran_on != device:
        say(f"warning: cell {record.id} ran on {ran_on} and is rebuilt on {device}; "
            "training numerics may differ slightly (save_models = true keeps the exact model)")
    inputs = InputCache(registry, device).inputs(cell, data)
    with tempfile.TemporaryDirectory(prefix="qcompare-rebuild-") as scratch:
        # checkpoints and trainer logs of the rebuild go to scratch, never into the stored cell
        context = CellContext(cell_dir=Path(scratch), seed=cell.seed, device=device, tokenizer=inputs.tokenizer,
                              teacher=inputs.teacher, data=inputs.data, task_folders=list(registry.task_folders))
        pipeline = CellPipeline(cell, inputs, context, registry)
        # the coverage the run accepted (a recipe's min_coverage is not part of the stored settings)
        pipeline.min_coverage = record.checks.get("coverage", {}).get("minimum", pipeline.min_coverage)
        model, _ = pipeline.build()
        if evaluated is not None:
            comparison = evaluated.compare(model)
            rtol = dtype_tolerance(model)
            if not comparison.within(rtol):
                raise CheckFailed(
                    f"cell {record.id}: the rebuilt model differs from the evaluated one by up to "
                    f"{comparison.max_abs_diff:.3g} on the probe batch (top-1 agreement {comparison.top1_agreement:.1%}); "
                    "the run's numbers do not describe it, so it is not exported (save_models = true keeps the exact "
                    "model)", "rebuild", comparison.as_dict(rtol))
        pipeline.save_checked(model, folder)
        return {"rebuild": "the rebuilt model's probe logits match the evaluated model's" if evaluated is not None
                else "not compared: the cell keeps no probe logits (made by an older qcompare)",
                **{k: v for k, v in pipeline.checks.items()}}
