"""Fresh Pythons without paying for their imports each time.

The reload check loads a saved folder in a Python that owes nothing to the process that saved it:
no module it patched, no plugin it registered, no model it holds. Starting such a Python costs
about five seconds of imports on a CPU (torch, then transformers' auto classes, which pull in
scikit-learn and pandas) before the folder is even opened, and a run reloads every saved cell.

So one helper process per run does those imports once — ``torch`` and
``transformers.AutoModelForCausalLM``, the first two lines of every model card's code and nothing
of qcompare's — and forks a child for each script. The child is a fresh Python in every way the
check relies on: what the script imports or patches is its own and dies with it. The helper is
started in this process's environment and working folder, and started again when either changed (each
script sees the caller's environment as it is at the call);
where it cannot start, each script runs in a new interpreter as before.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

# What the helper imports before it forks: the first lines of every model card's code.
PRELOAD = "import torch\nfrom transformers import AutoModelForCausalLM"
# The helper: imports once, then forks a child per request, whose output goes to the request's log.
_HELPER = r"""
import json, os, sys, traceback, warnings
warnings.filterwarnings("ignore", category=DeprecationWarning)  # fork() beside the allocator's own threads
exec(sys.argv[1])
print("READY", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdin = open(os.devnull)
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["-c", *request["argv"]]
            exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""

# Variables that change between calls and that no import reads: the script sees them as they are,
# and a change does not start another helper (pytest names the current test in one).
VOLATILE = frozenset({"PYTEST_CURRENT_TEST"})

_lock = threading.Lock()
_helper: dict = {}  # key, process; at most one helper per process


def run(script: str, argv: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run ``script`` (Python source) as ``python -c script *argv`` with ``env``, in a fresh Python;
    its exit code and its stdout and stderr together."""
    with _lock:
        process = _ready(env)
        if process is not None:
            try:
                process.stdin.write(json.dumps({"script": script, "argv": argv, "env": env, "log": str(log)}) + "\n")
                process.stdin.flush()
                reply = process.stdout.readline()
            except (BrokenPipeError, OSError):
                reply = ""
            if reply:
                return json.loads(reply), _read(log)
            _stop()  # the helper itself died: this script runs on its own, the next call starts another
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return done.returncode, done.stdout


def _ready(env: dict[str, str]):
    key = (os.getpid(), os.getcwd(), sys.executable, tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE)))
    if _helper.get("key") == key and (_helper["process"] is None or _helper["process"].poll() is None):
        return _helper["process"]  # None: it could not start in this environment; do not try each call
    if _helper.get("key", (None,))[0] == os.getpid():
        _stop()
    _helper.clear()  # a forked child never touches its parent's helper
    process = subprocess.Popen([sys.executable, "-c", _HELPER, PRELOAD], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if process.stdout.readline().strip() != "READY":
        process.kill()
        process.wait()
        process = None
    _helper.update(key=key, process=process)
    return process


def _stop() -> None:
    process = _helper.pop("process", None)
    _helper.clear()
    if process is None:
        return
    try:
        process.stdin.close()
        process.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()


def _read(log: Path) -> str:
    try:
        return Path(log).read_text(errors="replace")
    except OSError:
        return ""


@atexit.register
def _at_exit() -> None:
    if _helper.get("key", (None,))[0] == os.getpid():
        _stop()
