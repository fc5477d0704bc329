"""Where output goes during a run: qcompare's own lines to the terminal or log it was started in;
what the libraries print while a cell runs (datasets' and llm-compressor's progress bars,
transformers' and lm-eval's warnings and logs) to that cell's own log file (``cells/<id>/output.log``).

Libraries write through every channel there is: ``print`` and tqdm look up ``sys.stderr`` when
they write, logging handlers and loguru keep the stream they were given at import, native code
writes to file descriptors 1 and 2. ``cell_output`` redirects all of them for the span of a cell;
``own_stream`` gives the run's display a stream of its own, which that redirection leaves alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import IO, Iterator


def own_stream(stream: IO[str]) -> IO[str]:
    """A stream to ``stream``'s destination that ``cell_output`` does not redirect: a duplicate of
    its file descriptor, or (a stream without one, as under a test runner) the stream itself."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace")


class _Router(io.TextIOBase):
    """A standard stream that writes to the running cell's log, else to the stream it stands for.

    Whatever takes hold of ``sys.stderr`` during a cell (a logging handler or loguru sink created by
    a library imported then, a tqdm bar) keeps this object, which stays valid after the cell."""

    def __init__(self, fallback: IO[str]):
        self.fallback, self.target = fallback, None

    def _to(self) -> IO[str]:
        return self.target if self.target is not None else self.fallback

    def write(self, s: str) -> int:
        try:
            return self._to().write(s)
        except ValueError:  # the stream it stood for is closed (a test runner's): the process's own
            return sys.__stderr__.write(s)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self._to().flush()

    def fileno(self) -> int:
        return self._to().fileno()

    def isatty(self) -> bool:
        return False


_routers: dict[str, _Router] = {}


def _router(name: str) -> _Router:
    current = getattr(sys, name)
    router = _routers.get(name)
    if router is None or (current is not router and router.fallback is not current):
        router = _routers[name] = _Router(current)
    return router


def _terminal_handlers() -> list[logging.StreamHandler]:
    """Logging handlers that write to the process's standard streams (not to files)."""
    standard = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in standard]


def _flush(*streams) -> None:
    for s in streams:
        with contextlib.suppress(Exception):
            s.flush()


@contextlib.contextmanager
def cell_output(path: Path | None) -> Iterator[None]:
    """Send everything printed while the block runs to ``path`` (appended); ``None``: leave it be."""
    if path is None:
        yield
        return
    _flush(sys.stdout, sys.stderr)
    out, err = _router("stdout"), _router("stderr")
    with open(path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        saved = []
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(log.fileno(), fd)
        handlers = [(h, h.setStream(err)) for h in _terminal_handlers()]
        out.target = err.target = log
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            _flush(out, err, *(h for h, _ in handlers))
            out.target = err.target = None
            for handler, stream in handlers:
                handler.setStream(stream)
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
