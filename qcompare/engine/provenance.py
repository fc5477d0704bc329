"""Where a result came from: package versions, code version, hardware, and the identity of
every plugin a cell used (so a cell made by another version of a plugin is known as stale)."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from qcompare.sdk.memo import memo, memo_dict

PACKAGES = ("qcompare", "torch", "transformers", "trl", "torchao", "lm_eval", "datasets", "peft", "accelerate", "llmcompressor")


def git_sha(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware() -> dict:
    import os

    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git_sha": git_sha(Path(__file__).resolve().parent), **hardware()}


# --- plugins --------------------------------------------------------------------------


@memo
def _direct_url(dist: str) -> dict:
    """PEP 610's record of how a distribution was installed (editable, from a folder), if any."""
    try:
        text = metadata.distribution(dist).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return {}
    return json.loads(text) if text else {}


def _module_file(module: str) -> Path | None:
    """The source file of ``module``, found from its top-level package's folder without importing
    anything below it (find_spec of a.b.c would import a.b; a name imported from a module, not a
    module itself, has no file and gives None)."""
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for folder in spec.submodule_search_locations or []:
        base = Path(folder).joinpath(*rest.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
    return None


def _local_imports(path: Path, module: str, top: str) -> set[str]:
    """The modules of package ``top`` that ``module`` (at ``path``) imports, absolute or relative."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == top or m.startswith(top + ".")}


@memo
def source_digest(module: str) -> str | None:
    """A hash of the source of ``module`` and of every module of its own package it imports,
    transitively: what the plugin's behaviour can depend on within its package."""
    top = module.split(".")[0]
    todo, files = [module], {}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or name in files:
            continue
        files[name] = path
        todo += [m for m in _local_imports(path, name, top) if m not in files]
    if not files:
        return None
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return h.hexdigest()[:12]


def plugin_identity(entry) -> dict:
    """What made a result: the plugin's distribution and version, and where it was installed
    from a folder or editable (or is not installed at all), a hash of its source."""
    cls = entry.obj
    module = getattr(cls, "__module__", None) or ""
    try:
        version = metadata.version(entry.package)
    except (metadata.PackageNotFoundError, ValueError):
        version = None
    info = _direct_url(entry.package) if version else {}
    local = version is None or info.get("url", "").startswith("file:") or info.get("dir_info", {}).get("editable")
    identity = {"package": entry.package, "version": version}
    if local:
        identity["source"] = source_digest(module)
    return identity


_file_digests: dict[tuple, dict] = memo_dict()


def model_identity(where: str) -> dict | None:
    """A local model folder by the content of its files (config, weights, tokenizer): a rebuilt or
    replaced model under the same name makes a run's finished cells stale instead of mixing
    results of two models. None for a hub id (its revision is the hub's business)."""
    folder = Path(where)
    return files_identity(folder) if folder.is_dir() else None


def files_identity(where: Path, recursive: bool = False) -> dict:
    """A file, or a folder's files (its subfolders too if ``recursive``), by content. The digest is
    kept per file listing (names, sizes, modification times) in this process and in qcompare's
    cache, so workers and later commands do not read the files again."""
    from qcompare.sdk.cache import read_cache, write_cache

    if where.is_file():
        files, root = [where], where.parent
    else:
        found = where.rglob("*") if recursive else where.iterdir()
        files, root = sorted(p for p in found if p.is_file() and not p.name.startswith(".")), where
    names = [str(p.relative_to(root)) for p in files]
    key = (str(where.resolve()), tuple((n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in zip(names, files)))
    if key not in _file_digests:
        cache_key = "model-files:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
        cache = read_cache()
        if cache_key not in cache:
            h = hashlib.sha256()
            for name, p in zip(names, files):
                h.update(name.encode() + b"\0")
                with p.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            cache[cache_key] = {"files": len(files), "sha256": h.hexdigest()[:16]}
            write_cache(cache)
        _file_digests[key] = cache[cache_key]
    return _file_digests[key]
