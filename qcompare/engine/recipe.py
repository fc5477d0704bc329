"""TOML recipes: load, override with ``--set``, and validate against every plugin's schema.

Validation collects every mistake before it reports, each as
``FILE: field.path: what is wrong; what is allowed``.
"""

from __future__ import annotations

import itertools
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from qcompare.sdk.api import added_defaults, runtime_keys
from qcompare.errors import QcompareError, RecipeError
from qcompare.sdk.extras import tracker_problems
from qcompare.sdk.registry import Registry, get_registry


class PluginChoice(BaseModel):
    """One plugin with one resolved set of parameters (one point of its sweep)."""

    model_config = ConfigDict(frozen=True)
    name: str
    params: dict[str, Any] = {}
    # The parameters that tell this choice apart from the recipe's other choices of the same
    # plugin; only they appear in labels. Not a setting: cell ids ignore it.
    label_keys: tuple[str, ...] = ()
    # Parameters declared with RuntimeField: they change how a cell runs, not its result.
    runtime_keys: tuple[str, ...] = ()
    # Parameters declared with AddedField and their defaults: at the default, ids leave them out.
    added_defaults: dict[str, Any] = {}
    # Quantizers only: the share of the body's weights that must end quantized (the coverage
    # check); None takes the default. A check threshold, not a setting: cell ids ignore it.
    min_coverage: float | None = None

    def settings(self) -> dict[str, Any]:
        """What the cell's result depends on (hashed into its id)."""
        return {"name": self.name, "params": {k: v for k, v in self.params.items() if k not in self.runtime_keys
                                              and not (k in self.added_defaults and v == self.added_defaults[k])}}

    def label(self) -> str:
        inner = ",".join(f"{k}={self.params[k]}" for k in self.label_keys)
        return f"{self.name}({inner})" if inner else self.name


def with_labels(choices: list[PluginChoice]) -> list[PluginChoice]:
    """Mark, per plugin name, the parameters whose values differ between its choices."""
    out = []
    for c in choices:
        same = [o for o in choices if o.name == c.name]
        keys = tuple(k for k in c.params if k not in c.runtime_keys and len({repr(o.params.get(k)) for o in same}) > 1)
        out.append(c.model_copy(update={"label_keys": keys}))
    return out


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: str | None = Field(None, description="registered dataset name, local .jsonl/.parquet, or hub dataset id")
    split: str = "train"
    subset: int | None = Field(None, gt=0, description="use only this many examples")
    shuffle_seed: int = 0


class ReportSettings(BaseModel):
    """``[report]``: how the run's results are judged (used by ``qcompare report`` and ``export_best``)."""

    model_config = ConfigDict(extra="forbid")
    margin: float | None = Field(None, gt=0, description="equivalence margin of --compare verdicts (e.g. 0.01)")
    select_on: str | None = Field(None, pattern=r"^[^/\s]+/[^/\s]+$",
                                  description="the metric that picks a best configuration and seed (export_best, "
                                  "--fold best): a validation metric apart from the reported ones, e.g. "
                                  "toy-heldout-vs-teacher/kl")


class Recipe(BaseModel):
    """A validated recipe: every plugin choice expanded to its sweep points."""

    name: str
    description: str = ""
    source: Path
    text: str
    overrides: list[str] = []  # the --set assignments applied on top of ``text``
    models: list[str]
    seeds: list[int]
    device: str
    teacher: bool
    report_to: list[str]
    save_models: bool = False
    export_best: str = ""
    report: ReportSettings = ReportSettings()
    output: Path | None
    data: DataSpec
    quantizers: list[PluginChoice]
    distillers: list[PluginChoice]
    evaluators: list[PluginChoice]
    executor: PluginChoice


TOP_LEVEL = {
    "name": "recipe name (default: the file's stem)",
    "description": "free text",
    "models": "list of hub ids, local folders or registered model names",
    "seeds": "list of integers",
    "device": "auto, cpu or cuda",
    "teacher": "evaluate the unquantized model as a baseline (true/false)",
    "report_to": "experiment trackers, as transformers' report_to (tensorboard, wandb, mlflow, ...)",
    "save_models": "write every cell's converted model to cells/<id>/model/ (true/false)",
    "export_best": "a metric (average, task/metric): export the best cell by it to <run folder>/best/",
    "output": "run folder (default runs/<name>)",
    "report": "table: margin (equivalence margin of verdicts), select_on (metric that picks a best configuration)",
    "data": "table: train, split, subset, shuffle_seed",
    "quantizers": "array of tables with name = ... and parameters",
    "distillers": "array of tables with name = ... and parameters",
    "evaluators": "array of tables with name = ... and parameters",
    "executor": "table with name = ... and parameters",
}

_SET_RE = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+|\[\d+\])*)=(.*)$", re.S)


def parse_toml(path: Path) -> tuple[dict, str]:
    """The recipe file's table and text; one line for every way a file can fail to be a recipe."""
    if not path.exists():
        raise QcompareError(f"recipe file not found: {path}")
    if path.is_dir():
        raise QcompareError(f"recipe path is a folder, not a TOML file: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QcompareError(f"cannot read the recipe file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QcompareError(f"{path} is not UTF-8 text (byte {e.start}); a recipe is a TOML text file") from None
    if "\0" in text:
        raise QcompareError(f"{path} holds NUL bytes: not a text file; a recipe is a TOML text file")
    if not text.strip():
        raise QcompareError(f"recipe file is empty: {path}; a recipe names at least its models, e.g. "
                            "models = [\"toy-qwen3\"] (recipes/toy_int4.toml is a whole one)")
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise QcompareError(f"{path}: TOML syntax error: {e}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``--set path=value``; ``value`` is read as a TOML value, else as a string."""
    m = _SET_RE.match(assignment.strip())
    if not m:
        raise QcompareError(
            f"malformed --set {assignment!r}; expected FIELD.PATH=VALUE, e.g. seeds=[0,1] or quantizers[0].bits=4"
        )
    path, text = m.groups()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list) and isinstance(key, int) and key >= len(node):
            raise QcompareError(f"--set {assignment!r}: index {key} is outside the list of {len(node)}")
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            if isinstance(key, str) and isinstance(node, dict) and not isinstance(keys[i + 1], int):
                node = node.setdefault(key, {})
                continue
            raise QcompareError(f"--set {assignment!r}: the recipe has no field {'.'.join(map(str, keys[: i + 1]))}") from None
    last = keys[-1]
    where = ".".join(map(str, keys[:-1]))
    if isinstance(node, list) and (not isinstance(last, int) or last >= len(node)):
        raise QcompareError(f"--set {assignment!r}: index {last} is outside the list of {len(node)}")
    if not isinstance(node, (dict, list)) or (isinstance(node, dict) and isinstance(last, int)):
        raise QcompareError(f"--set {assignment!r}: {where} = {node!r} is not a table; it has no field {last}")
    node[last] = value


def _is_list_type(annotation) -> bool:
    """Whether a field itself holds a list (so a recipe list is its value, not a sweep)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list_type(a) for a in typing.get_args(annotation))
    if origin is Annotated:
        return _is_list_type(typing.get_args(annotation)[0])
    return annotation in (list, tuple, set)


def _fmt_error(err: dict) -> str:
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error" and "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    return msg[0].lower() + msg[1:]


def expand_plugin(kind: str, spec: Any, where: str, registry: Registry, errors: list[str], sweep: bool = True) -> list[PluginChoice]:
    """Validate one ``[[quantizers]]``-style table and return its sweep points."""
    if not isinstance(spec, dict) or "name" not in spec:
        errors.append(f"{where}: needs a table with name = \"...\"")
        return []
    name = spec["name"]
    try:
        cls = registry.get(kind, name)
    except QcompareError as e:
        errors.append(f"{where}.name: {e}")
        return []
    fields = cls.Params.model_fields
    axes: dict[str, list] = {}
    ok = True
    min_coverage = None
    for key, value in spec.items():
        if key == "name":
            continue
        if key == "min_coverage" and kind == "quantizer" and key not in fields:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                errors.append(f"{where}.min_coverage: bad value {value!r}; give the share of the body's weights that "
                              "must end quantized, between 0 and 1 (default 0.95)")
                ok = False
            min_coverage = value
            continue
        if key not in fields:
            allowed = ", ".join([*fields, *(["min_coverage"] if kind == "quantizer" else [])]) or "(no parameters)"
            errors.append(f"{where}.{key}: unknown parameter of {kind} {name!r}; allowed: {allowed}")
            ok = False
            continue
        info = fields[key]
        list_valued = _is_list_type(info.annotation)
        is_sweep = isinstance(value, list) and (not list_valued or (value and all(isinstance(v, list) for v in value)))
        if is_sweep and not sweep:
            errors.append(f"{where}.{key}: {kind}s are not swept; give one value")
            ok = False
            continue
        values = value if is_sweep else [value]
        if is_sweep and not values:
            errors.append(f"{where}.{key}: empty sweep list; give at least one value")
            ok = False
            continue
        adapter = TypeAdapter(Annotated[info.annotation, info])
        for v in values:
            try:
                adapter.validate_python(v)
            except ValidationError as e:
                ok = False
                for err in e.errors():
                    errors.append(f"{where}.{key}: bad value {v!r}: {_fmt_error(err)}")
        axes[key] = values
    missing = [k for k, f in fields.items() if f.is_required() and k not in spec]
    for k in missing:
        errors.append(f"{where}.{k}: required parameter of {kind} {name!r} is missing")
    if not ok or missing:
        return []
    points = []
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        try:
            params = cls.Params.model_validate(dict(zip(keys, combo)))
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(map(str, err["loc"])) or "(parameters)"
                errors.append(f"{where}.{loc}: {_fmt_error(err)} (with {dict(zip(keys, combo))})")
            continue
        points.append(PluginChoice(name=name, params=params.model_dump(mode="json"), runtime_keys=runtime_keys(cls.Params),
                                   added_defaults=added_defaults(cls.Params),
                                   min_coverage=None if min_coverage is None else float(min_coverage)))
    return points


def looks_like_path(value: str) -> bool:
    return value.endswith((".jsonl", ".json", ".parquet")) or value.startswith((".", "/", "~"))


def resolve_local_path(value: str, recipe_dir: Path) -> Path | None:
    """A data file or model folder named relative to the working directory or the recipe."""
    for base in (Path.cwd(), recipe_dir):
        p = (base / value).expanduser()
        if p.exists():
            return p.resolve()
    return None


def validate(raw: dict, source: Path, text: str = "", registry: Registry | None = None) -> Recipe:
    """Check a parsed recipe against the schema and every plugin; raise RecipeError listing all mistakes."""
    registry = registry or get_registry()
    errors: list[str] = []
    f = str(source)
    for key in raw:
        if key not in TOP_LEVEL:
            errors.append(f"{f}: {key}: unknown top-level field; allowed: {', '.join(TOP_LEVEL)}")

    def check(key, adapter_type, default):
        if key not in raw:
            return default
        try:
            return TypeAdapter(adapter_type).validate_python(raw[key])
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in (key, *err["loc"]))
                errors.append(f"{f}: {loc}: bad value {err.get('input')!r}: {_fmt_error(err)}")
            return default

    name = check("name", Annotated[str, Field(pattern=r"^[\w.-]+$")], source.stem)
    models = check("models", Annotated[list[str], Field(min_length=1)], [])
    if "models" not in raw:
        errors.append(f"{f}: models: missing; give a list of hub ids, local folders or registered names")
    seeds = check("seeds", Annotated[list[int], Field(min_length=1)], [0])
    device = check("device", Literal["auto", "cpu", "cuda"], "auto")
    teacher = check("teacher", bool, True)
    report_to = check("report_to", list[str], [])
    report_to = [] if report_to == ["none"] else report_to
    errors += [f"{f}: report_to: {p}" for p in tracker_problems(report_to)]
    save_models = check("save_models", bool, False)
    export_best = check("export_best", str, "")
    if export_best and export_best != "average" and not re.fullmatch(r"[^/\s]+/[^/\s]+", export_best):
        errors.append(f"{f}: export_best: bad value {export_best!r}; give 'average' or a metric as task/metric, "
                      "e.g. toy_facts/acc")
    output = check("output", str | None, None)
    description = check("description", str, "")

    report = ReportSettings()
    if "report" in raw:
        try:
            report = ReportSettings.model_validate(raw["report"])
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in ("report", *err["loc"]))
                errors.append(f"{f}: {loc}: {_fmt_error(err)}")
    data = DataSpec()
    if "data" in raw:
        try:
            data = DataSpec.model_validate(raw["data"])
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in ("data", *err["loc"]))
                errors.append(f"{f}: {loc}: {_fmt_error(err)}")
    if data.train and data.train not in registry.datasets and looks_like_path(data.train):
        found = resolve_local_path(data.train, source.parent)
        if found is None:
            errors.append(f"{f}: data.train: file not found: {data.train}")
        else:
            data = data.model_copy(update={"train": str(found)})

    for m in models:
        if m not in registry.models and looks_like_path(m) and resolve_local_path(m, source.parent) is None:
            errors.append(f"{f}: models: folder not found: {m}; known names: {', '.join(registry.models) or '(none)'}")

    def plugins(kind: str, default: list, sweep: bool = True) -> list[PluginChoice]:
        key = f"{kind}s"
        specs = raw.get(key, default)
        if not isinstance(specs, list):
            errors.append(f"{f}: {key}: expected an array of tables ([[{key}]])")
            return []
        out = []
        for i, spec in enumerate(specs):
            out += expand_plugin(kind, spec, f"{f}: {key}[{i}]", registry, errors, sweep=sweep)
        return out

    quantizers = plugins("quantizer", [])
    distillers = plugins("distiller", [{"name": "none"}] if raw.get("quantizers") else [])  # "none": PTQ
    evaluators = plugins("evaluator", [], sweep=False)
    ex = raw.get("executor", {"name": "local"})
    ex = ex if isinstance(ex, dict) else {}
    ex.setdefault("name", "local")
    executors = expand_plugin("executor", ex, f"{f}: executor", registry, errors, sweep=False)

    out_path = Path(output) if output else None
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        errors.append(f"{f}: output: {output} is a file; give a folder path")
    if "quantizers" in raw and raw["quantizers"] == []:
        errors.append(f"{f}: quantizers: an empty list; give at least one [[quantizers]] table (leave the key out "
                      "for a teacher-only run)")
    elif not quantizers and raw.get("distillers") and not any(e.startswith(f"{f}: quantizers") for e in errors):
        errors.append(f"{f}: distillers: {len(raw['distillers'])} [[distillers]] tables but no [[quantizers]]: "
                      "distillers train quantized students, so they would be ignored; add a [[quantizers]] table or "
                      "remove them")
    if not errors and not teacher and not (quantizers and distillers):
        errors.append(f"{f}: the recipe expands to zero cells; give at least one [[quantizers]] table or teacher = true")
    if errors:
        raise RecipeError(errors)
    return Recipe(
        name=name, description=description, source=source, text=text, models=models, seeds=seeds,
        device=device, teacher=teacher, report_to=report_to, save_models=save_models, export_best=export_best,
        report=report,
        output=out_path, data=data,
        quantizers=with_labels(quantizers), distillers=with_labels(distillers), evaluators=evaluators,
        executor=executors[0],
    )


def load_recipe(path: str | Path, overrides: list[str] = (), registry: Registry | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    raw, text = parse_toml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, path, text, registry).model_copy(update={"overrides": list(overrides)})


def report_settings(run_dir: Path) -> ReportSettings:
    """The ``[report]`` table of the recipe a run folder was last run with (defaults if none)."""
    path = Path(run_dir) / "recipe.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return ReportSettings()
    try:
        return ReportSettings.model_validate(raw.get("report", {}))
    except ValidationError:
        return ReportSettings()
