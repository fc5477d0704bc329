"""The ``lm_eval`` evaluator: lm-evaluation-harness tasks on the in-memory model."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from qcompare.sdk import EvalResult, Evaluator, Params, QcompareError, memo_dict
from qcompare_plugins.evaluators.quiet import kept_rng_state, progress_through, quiet_lm_eval, without_environment_report

# "auto" makes lm-eval try ever larger batches until one fails to fit: worth it on a GPU,
# pointless on a CPU, where a fixed size is as fast and starts at once.
CPU_BATCH_SIZE = 8
OFFLINE_HINT = "to run offline, put a task YAML over local JSONL in a folder and name it in include_path (see plugins/toy/tasks)"

_task_managers: dict = memo_dict()  # lm-eval's task index by include_path: built once per process


class LmEvalParams(Params):
    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names (hellaswag, arc_easy, mmlu, toy ...)")
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    limit: Annotated[float, Field(gt=0)] | None = Field(None, description="examples per task: a count, or a fraction if < 1")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    apply_chat_template: bool = False
    include_path: list[str] = Field(default_factory=list, description="extra folders of task YAMLs")


class LmEvalEvaluator(Evaluator):
    """lm-evaluation-harness tasks (accuracy with stderr, per-item correctness)."""

    name = "lm_eval"
    reads_task_folders = True  # toy tasks and plugins' task folders: their files count in a cell's identity
    Params = LmEvalParams

    def evaluate(self, model, params, context):
        tokenizer = context.tokenizer
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        task_manager = _task_manager_for(params.tasks, _folders(params, context.task_folders))
        if params.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise QcompareError("lm_eval: apply_chat_template = true but the tokenizer has no chat template; set it to false")
        batch_size = params.batch_size
        if batch_size == "auto" and model.device.type != "cuda":
            batch_size = CPU_BATCH_SIZE
        limit = params.limit if params.limit is None or params.limit < 1 else int(params.limit)

        result = EvalResult()
        with quiet_lm_eval(), without_environment_report(), kept_rng_state():
            with _untied(model):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            # One lm-eval run per requested task, so each gets its own progress bar.
            for name in params.tasks:
                loaded = _load(task_manager, name)
                _record_weighting(loaded, result)
                bar = lambda kind, total, name=name: context.progress.task(f"lm_eval: {name} ({kind})", total=total)  # noqa: E731
                with progress_through(bar):
                    out = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=loaded,
                        task_manager=task_manager,
                        num_fewshot=params.num_fewshot,
                        limit=limit,
                        apply_chat_template=params.apply_chat_template,
                        log_samples=True,
                    )
                _collect(out, result)
        return result


    def check(self, params, task_folders):
        """Every task name is a task, group or tag lm-eval knows, or a YAML file (from an index of task names
        kept in qcompare's cache: building it imports lm-eval and reads its ~15k task files, once)."""
        folders = _folders(params, task_folders)
        names = [t for t in params.tasks if not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
        if not names:
            return
        known = task_names(folders)
        for t in names:
            if t not in known:
                raise unknown_task(t, sorted(known), folders)


def unknown_task(name: str, known: list[str], folders: list[Path]) -> QcompareError:
    """The one line for a task name lm-eval does not know (at validate, and when a cell evaluates)."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = ", ".join(str(f) for f in folders) or "no task folders"
    return QcompareError(f"lm_eval: unknown task {name!r}{hint}: not an lm-eval task nor in {where}; {OFFLINE_HINT}")


_INDEX = """import json, sys
from lm_eval.tasks import TaskManager
folders = json.loads(sys.argv[1])
print(json.dumps(sorted(TaskManager(include_path=folders or None, include_defaults=True).task_index)))
"""


def task_names(folders: list[Path]) -> set[str]:
    """The task, group and tag names lm-eval knows with ``folders`` included: from qcompare's cache, keyed by
    lm-eval's version and the folders' task files (names and times), else indexed in a separate Python so
    that this one stays light."""
    import hashlib
    import json
    import subprocess
    import sys
    from importlib import metadata

    from qcompare.sdk import read_cache, write_cache

    files = [(str(f), sorted((str(y.relative_to(f)), y.stat().st_mtime_ns) for y in Path(f).rglob("*.y*ml")))
             for f in folders]
    key = "lm_eval_tasks:" + hashlib.sha256(json.dumps([metadata.version("lm_eval"), files]).encode()).hexdigest()[:24]
    cache = read_cache()
    if key not in cache:
        done = subprocess.run([sys.executable, "-c", _INDEX, json.dumps([str(f) for f in folders])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise QcompareError(f"lm_eval: could not index its tasks to check the names ({tail})")
        cache[key] = json.loads(done.stdout.strip().splitlines()[-1])
        write_cache(cache)
    return set(cache[key])


def _folders(params: LmEvalParams, task_folders) -> list[Path]:
    folders = [Path(p) for p in task_folders]
    for p in params.include_path:
        if not Path(p).is_dir():
            raise QcompareError(f"lm_eval: include_path {p!r} is not a folder; give folders of task YAMLs")
        folders.append(Path(p).resolve())
    return folders


def _task_manager_for(tasks: list[str], folders: list[Path]):
    """A TaskManager that knows every task in ``tasks``; unknown names are QcompareErrors.

    Indexing lm-eval's ~15k built-in tasks takes ~4 s, so it is done only when a task is
    not in the plugin folders, and each index is kept for the process.
    """
    local = _task_manager(tuple(folders), include_defaults=False)
    if all(_known(local, t) for t in tasks):
        return local
    full = _task_manager(tuple(folders), include_defaults=True)
    for t in tasks:
        if not _known(full, t):
            raise unknown_task(t, full.all_tasks, folders)
    return full


def _known(task_manager, name: str) -> bool:
    return name in task_manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def _task_manager(folders: tuple[Path, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (folders, include_defaults)
    if key not in _task_managers:
        with quiet_lm_eval():
            _task_managers[key] = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=include_defaults)
    return _task_managers[key]


def _load(task_manager, name: str) -> list:
    """Build one task (or group) ourselves, so a dataset that can't be reached names its task."""
    try:
        with _working_dir(_yaml_folder(task_manager, name)):
            loaded = task_manager.load([name])
    except OSError as e:  # ConnectionError under HF_HUB_OFFLINE=1, FileNotFoundError, DatasetNotFoundError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QcompareError(f"lm_eval: task {name!r} can't load its dataset ({reason}); {OFFLINE_HINT}") from None
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: its tasks


def _yaml_folder(task_manager, name: str) -> Path | None:
    """The folder of a plugin's task YAML (None for lm-eval's own tasks)."""
    entry = task_manager.task_index.get(name)
    path = entry.yaml_path if entry is not None else Path(name) if name.endswith((".yaml", ".yml")) else None
    if path is None or "lm_eval/tasks" in Path(path).resolve().as_posix():
        return None
    return Path(path).resolve().parent


@contextlib.contextmanager
def _working_dir(folder: Path | None):
    """lm-eval hands ``data_files`` to ``datasets.load_dataset``, which reads relative paths
    from the current directory; loading a task from its own folder lets a task YAML name
    the JSONL beside it, so task folders work from any directory and on any machine."""
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _untied(model):
    """HFLM calls ``model.tie_weights()``, which would point a tied lm_head back at the
    embedding and undo a quantizer that treated the two differently: evaluate as given."""
    model.tie_weights = lambda *a, **k: None
    try:
        yield
    finally:
        del model.tie_weights


def _collect(out: dict, result: EvalResult) -> None:
    """Turn lm-eval's ``results`` and ``samples`` into ``task/metric`` numbers and per-item scores.

    lm-eval names a result ``metric,filter``; the filter stays in the key only where a task
    has several (gsm8k: ``exact_match,strict-match`` and ``exact_match,flexible-extract``).
    """
    for task, row in out["results"].items():
        numbers = {k: float(v) for k, v in row.items() if "," in k and _is_number(v)}
        several = len({k.split(",", 1)[1] for k in numbers}) > 1
        for key, value in numbers.items():
            metric, filter_name = key.split(",", 1)
            table = result.stderr if metric.endswith("_stderr") else result.metrics
            metric = metric.removesuffix("_stderr")
            table[f"{task}/{metric},{filter_name}" if several else f"{task}/{metric}"] = value
    for group, subtasks in out.get("group_subtasks", {}).items():
        if subtasks:
            result.groups[group] = list(subtasks)
    for task, samples in out.get("samples", {}).items():
        items = _items(samples)
        if items is not None:
            result.items[task] = items


def _items(samples: list[dict]):
    """A task's per-item scores for every metric and filter it reports (named as the table names
    them), in doc order, each item named by its doc id and lm-eval's hash of the document."""
    from qcompare.sdk import Items

    if not samples:
        return None
    filters = list(dict.fromkeys(s["filter"] for s in samples))
    first = sorted((s for s in samples if s["filter"] == filters[0]), key=lambda s: s["doc_id"])
    ids = [f"{s['doc_id']}:{str(s.get('doc_hash', ''))[:16]}" for s in first]
    metrics = {}
    for filter_name in filters:
        rows = sorted((s for s in samples if s["filter"] == filter_name), key=lambda s: s["doc_id"])
        if [s["doc_id"] for s in rows] != [s["doc_id"] for s in first]:
            continue
        for metric in rows[0]["metrics"]:
            if all(_is_number(s.get(metric)) for s in rows):
                metrics[f"{metric},{filter_name}" if len(filters) > 1 else metric] = [float(s[metric]) for s in rows]
    return Items(ids, metrics) if metrics else None


def _record_weighting(loaded: list, result: EvalResult) -> None:
    """How each group among ``loaded`` (and its subgroups) aggregates its subtasks: lm-eval's
    ``weight_by_size`` (a group without an aggregate has no score of its own: left out)."""
    for group in loaded:
        aggregates = getattr(group, "aggregate_metric_list", None)
        name = getattr(group, "name", None)
        if name and aggregates:
            result.group_weighting[str(name)] = "size" if aggregates[0].weight_by_size else "equal"
        for child in getattr(group, "_children", {}).values():
            _record_weighting([child], result)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
