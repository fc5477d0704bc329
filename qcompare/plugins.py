"""The plugin manager and the registry of everything plugins offer.

Built-in plugins are found exactly as a third party's are: through entry points in the
group ``qcompare``. ``QCOMPARE_PLUGINS`` (comma-separated entry-point names; empty for
none) limits which entry points load.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pluggy

from qcompare import hookspecs
from qcompare.api import Distiller, Evaluator, Executor, Plugin, Quantizer
from qcompare.errors import QcompareError

GROUP = "qcompare"
KINDS = {"quantizer": Quantizer, "distiller": Distiller, "evaluator": Evaluator, "executor": Executor}


@dataclass
class Entry:
    kind: str
    name: str
    obj: object
    package: str


@dataclass
class Registry:
    """Everything registered, by kind and name, with the package each came from."""

    plugins: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    task_folders: list[Path] = field(default_factory=list)

    def get(self, kind: str, name: str) -> type[Plugin]:
        known = self.plugins[kind]
        if name not in known:
            raise QcompareError(unknown_name_message(kind, name, known))
        return known[name].obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])


def unknown_name_message(kind: str, name: str, known) -> str:
    msg = f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or '(none)'}"
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def _package_of(module) -> str:
    """The distribution that ships ``module``, or its module name for test plugins."""
    name = getattr(module, "__name__", None) or type(module).__module__
    dists = _distributions().get(name.split(".")[0])
    return dists[0] if dists else name


@functools.cache
def _distributions() -> dict[str, list[str]]:
    # scans every installed package: once per process, not once per hook implementation
    return metadata.packages_distributions()


def make_plugin_manager(extra: list | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    allowed = os.environ.get("QCOMPARE_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in metadata.entry_points(group=GROUP):
        if names is not None and ep.name not in names:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        pm.register(ep.load(), name=ep.name)
    for plugin in extra or []:
        pm.register(plugin)
    pm.check_pending()
    return pm


def _collect(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()

    def plugin_register(kind):
        hook = getattr(pm.hook, f"register_{kind}s")
        for impl in hook.get_hookimpls():
            package = _package_of(impl.plugin)

            def register(cls, _package=package):
                if not (isinstance(cls, type) and issubclass(cls, KINDS[kind])):
                    raise QcompareError(f"plugin {_package} registered {cls!r}, which is not a {KINDS[kind].__name__} subclass")
                _add(reg.plugins[kind], kind, cls.name, cls, _package)

            impl.function(**{a: register for a in impl.argnames})

    for kind in KINDS:
        plugin_register(kind)

    for hookname, table in (("register_models", reg.models), ("register_datasets", reg.datasets)):
        for impl in getattr(pm.hook, hookname).get_hookimpls():
            package = _package_of(impl.plugin)

            def register(name, path, description="", _package=package, _table=table, _kind=hookname[9:-1]):
                _add(_table, _kind, name, (Path(path), description), _package)

            impl.function(register)

    for impl in pm.hook.register_task_folders.get_hookimpls():
        impl.function(lambda folder: reg.task_folders.append(Path(folder)))
    return reg


def _add(table: dict, kind: str, name: str, obj, package: str) -> None:
    if name in table:
        raise QcompareError(
            f"two plugins register the {kind} {name!r}: {table[name].package} and {package}; "
            f"uninstall one or limit plugins with QCOMPARE_PLUGINS"
        )
    table[name] = Entry(kind, name, obj, package)


_extra: list = []
_cache: dict = {}


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


def get_registry() -> Registry:
    """The registry of every loaded plugin (built once per process and plugin set)."""
    return _loaded()[1]


def get_plugin_manager() -> pluggy.PluginManager:
    return _loaded()[0]
