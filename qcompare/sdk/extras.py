"""Optional packages a user's choice needs (a tracker, vLLM): one line naming the fix.

Checked when a recipe is validated where the choice is visible there (``report_to``), and
again where the package is imported, so a missing package never surfaces as a traceback
halfway through a sweep.
"""

from __future__ import annotations

import importlib
import importlib.util

from qcompare.errors import QcompareError

# transformers' report_to names qcompare knows → (module imported, pip requirement).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "trackio": ("trackio", "trackio"),
    "swanlab": ("swanlab", "swanlab"),
    "codecarbon": ("codecarbon", "codecarbon"),
}
# Values transformers takes that name no package.
TRACKER_WORDS = ("all", "none")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stub in sys.modules without a spec
        return False


def missing_message(module: str, pip: str, purpose: str) -> str | None:
    """None if ``module`` can be imported, else the one line that says what to install."""
    if installed(module):
        return None
    return f"{purpose} needs the {module} package, which is not installed; pip install {pip}"


def require(module: str, pip: str, purpose: str):
    """Import ``module`` or raise a one-line QcompareError naming the pip install that fixes it."""
    message = missing_message(module, pip, purpose)
    if message:
        raise QcompareError(message)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QcompareError(f"{purpose}: importing {module} failed ({e}); pip install -U {pip}") from None


def tracker_problems(report_to: list[str]) -> list[str]:
    """One message per unknown tracker name or tracker whose package is missing."""
    problems = []
    for name in report_to:
        if name in TRACKER_WORDS:
            continue
        if name not in TRACKERS:
            problems.append(f"unknown tracker {name!r}; allowed: {', '.join([*TRACKERS, *TRACKER_WORDS])}")
            continue
        message = missing_message(*TRACKERS[name], f"tracker {name!r}")
        if message:
            problems.append(message)
    return problems
