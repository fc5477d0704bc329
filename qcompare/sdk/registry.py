"""The plugin manager and the registry of everything plugins offer.

Built-in plugins are found exactly as a third party's are: through entry points in the
group ``qcompare``. ``QCOMPARE_PLUGINS`` (comma-separated entry-point names; empty for
none) limits which entry points load.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pluggy

from qcompare.sdk import hookspecs
from qcompare.sdk.api import Distiller, Evaluator, Executor, Plugin, Quantizer
from qcompare.errors import QcompareError
from qcompare.sdk.memo import memo, memo_dict

GROUP = "qcompare"
KINDS = {"quantizer": Quantizer, "distiller": Distiller, "evaluator": Evaluator, "executor": Executor}


@dataclass
class Entry:
    kind: str
    name: str
    obj: object
    package: str
    entry_point: str | None = None  # the entry-point name it came through (what QCOMPARE_PLUGINS takes)

    @property
    def source(self) -> str:
        return f"{self.package}, entry point {self.entry_point!r}" if self.entry_point else self.package


@dataclass
class Registry:
    """Everything registered, by kind and name, with the package each came from."""

    plugins: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    task_folders: list[Path] = field(default_factory=list)
    entry_points: list[str] = field(default_factory=list)  # loaded, in load order
    clashes: list[str] = field(default_factory=list)  # one line per name two plugins register

    def get(self, kind: str, name: str) -> type[Plugin]:
        known = self.plugins[kind]
        if name not in known:
            raise QcompareError(unknown_name_message(kind, name, known))
        return known[name].obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])


def unknown_name_message(kind: str, name: str, known: dict[str, Entry]) -> str:
    """One line: the unknown name, what is known grouped by where it comes from (each installed
    package's entry point), and the closest name."""
    groups: dict[str, list[str]] = {}
    for n in sorted(known):
        groups.setdefault(known[n].source, []).append(n)
    listed = "; ".join(f"{', '.join(names)} (from {source})" for source, names in groups.items())
    msg = f"unknown {kind} {name!r}; known: {listed or '(none)'}"
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def _package_of(module) -> str:
    """The distribution that ships ``module``, or its module name for test plugins."""
    name = getattr(module, "__name__", None) or type(module).__module__
    dists = _distributions().get(name.split(".")[0])
    return dists[0] if dists else name


@memo
def _distributions() -> dict[str, list[str]]:
    # scans every installed package: once per process, not once per hook implementation
    return metadata.packages_distributions()


def make_plugin_manager(extra: list | None = None, only: set[str] | None = None) -> pluggy.PluginManager:
    """A plugin manager with the entry points ``only`` names (default: what ``QCOMPARE_PLUGINS`` allows, else
    all) and the in-process plugins ``extra``."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    allowed = os.environ.get("QCOMPARE_PLUGINS")
    names = only if only is not None else None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in metadata.entry_points(group=GROUP):
        if names is not None and ep.name not in names:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        pm.register(ep.load(), name=ep.name)
        pm.qcompare_entry_points = [*getattr(pm, "qcompare_entry_points", []), ep.name]
    for plugin in extra or []:
        pm.register(plugin)
    pm.check_pending()
    return pm


def _collect(pm: pluggy.PluginManager) -> Registry:
    reg = Registry(entry_points=list(getattr(pm, "qcompare_entry_points", [])))

    def origin(plugin) -> tuple[str, str | None]:
        name = pm.get_name(plugin)
        return _package_of(plugin), name if name in reg.entry_points else None

    def plugin_register(kind):
        hook = getattr(pm.hook, f"register_{kind}s")
        for impl in hook.get_hookimpls():
            package, entry_point = origin(impl.plugin)

            def register(cls, _package=package, _entry_point=entry_point):
                if not (isinstance(cls, type) and issubclass(cls, KINDS[kind])):
                    raise QcompareError(f"plugin {_package} registered {cls!r}, which is not a {KINDS[kind].__name__} subclass")
                _add(reg, reg.plugins[kind], Entry(kind, cls.name, cls, _package, _entry_point))

            impl.function(**{a: register for a in impl.argnames})

    for kind in KINDS:
        plugin_register(kind)

    for hookname, table in (("register_models", reg.models), ("register_datasets", reg.datasets)):
        for impl in getattr(pm.hook, hookname).get_hookimpls():
            package, entry_point = origin(impl.plugin)

            def register(name, path, description="", _package=package, _table=table, _kind=hookname[9:-1],
                         _entry_point=entry_point):
                _add(reg, _table, Entry(_kind, name, (Path(path), description), _package, _entry_point))

            impl.function(register)

    for impl in pm.hook.register_task_folders.get_hookimpls():
        impl.function(lambda folder: reg.task_folders.append(Path(folder)))
    return reg


def _add(reg: Registry, table: dict, entry: Entry) -> None:
    """Register ``entry``; a name already taken keeps its first plugin and the clash is recorded."""
    first = table.get(entry.name)
    if first is None:
        table[entry.name] = entry
        return
    keep = [ep for ep in reg.entry_points if ep not in (first.entry_point, entry.entry_point)]
    hint = (f"uninstall one, or load one of them only: QCOMPARE_PLUGINS={','.join(keep + [first.entry_point])}"
            if first.entry_point and entry.entry_point else "uninstall one of them")
    reg.clashes.append(f"two plugins register the {entry.kind} {entry.name!r}: {first.source} and {entry.source}; {hint}")


_extra: list = []
_cache: dict = memo_dict()  # the registry, collected once per process (add_plugin resets it)


def add_plugin(plugin) -> None:
    """Register an in-process plugin module or object (tests, notebooks)."""
    _extra.append(plugin)
    _cache.clear()


def remove_plugin(plugin) -> None:
    _extra.remove(plugin)
    _cache.clear()


def _loaded() -> tuple[pluggy.PluginManager, Registry]:
    key = os.environ.get("QCOMPARE_PLUGINS")
    if key not in _cache:
        pm = make_plugin_manager(_extra)
        _cache.clear()
        _cache[key] = (pm, _collect(pm))
    return _cache[key]


def get_registry(clashes_allowed: bool = False) -> Registry:
    """The registry of every loaded plugin (built once per process and plugin set). Two plugins
    registering one name is an error (one line per clash) unless ``clashes_allowed`` (``qcompare
    plugins`` lists them, so the clash can be seen and fixed)."""
    reg = _loaded()[1]
    if reg.clashes and not clashes_allowed:
        raise QcompareError("\n".join(reg.clashes))
    return reg


def get_plugin_manager() -> pluggy.PluginManager:
    return _loaded()[0]


def origin_of(cls) -> dict:
    """Where a registered plugin class comes from: its package, version and entry point (None for a
    plugin registered in-process), as a folder saved in its format records it."""
    entry = next((e for e in get_registry(clashes_allowed=True).plugins[_kind_of(cls)].values() if e.obj is cls), None)
    dists = _distributions().get(cls.__module__.split(".")[0])
    package = entry.package if entry is not None else dists[0] if dists else cls.__module__
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = None
    return {"package": package, "version": version, "entry_point": entry.entry_point if entry is not None else None}


def _kind_of(cls) -> str:
    return next(kind for kind, base in KINDS.items() if issubclass(cls, base))


def quantizer_for_format(record: dict, folder) -> type[Quantizer]:
    """The quantizer class that saved ``folder`` in its own format (``record``: its qcompare_format.json),
    found through the entry point it came from, whatever ``QCOMPARE_PLUGINS`` says: the folder names
    it. A plugin registered in-process is found by its module. One line naming the package when neither
    is installed."""
    import importlib

    name, ep_name, module = record["quantizer"], record.get("entry_point"), record.get("module")
    points = list(metadata.entry_points(group=GROUP, name=ep_name)) if ep_name else []
    try:
        pm = make_plugin_manager(only={ep_name}) if points else \
            make_plugin_manager([importlib.import_module(module)], only=set()) if module else None
    except ImportError:
        pm = None
    found = _collect(pm).plugins["quantizer"].get(name) if pm is not None else None
    if found is None and pm is not None and not points:  # a module that defines the class but registers nothing
        cls = next((c for c in vars(importlib.import_module(module)).values()
                    if isinstance(c, type) and issubclass(c, Quantizer) and getattr(c, "name", None) == name), None)
        found = None if cls is None else Entry("quantizer", name, cls, module)
    if found is None:
        package = record.get("package") or module or "the plugin"
        version = f" {record['version']}" if record.get("version") else ""
        via = f"entry point {ep_name!r}" if ep_name else f"module {module!r}"
        raise QcompareError(f"{folder} is saved in the own format of the quantizer {name!r} ({package}{version}, {via}), "
                            f"which is not installed here: pip install {package}, then load it with "
                            "qcompare.load_pretrained")
    return found.obj
