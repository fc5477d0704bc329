"""Errors that are the user's to fix: shown as one line, exit code 2, no traceback."""


class QcompareError(Exception):
    """Bad input (recipe, flag, plugin, data file). The message names what is wrong and what is allowed."""


class RecipeError(QcompareError):
    """A recipe with one or more mistakes; ``errors`` lists every one."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def error_line(e: Exception) -> str:
    """How a failure reads in a result: the user's error as it is, anything else with its type."""
    return str(e) if isinstance(e, QcompareError) else f"{type(e).__name__}: {e}"


def transient(e: BaseException) -> bool:
    """Whether a cell that failed with ``e`` can end otherwise when run again with the same settings.

    Cells are seeded and deterministic, so only what lies outside them can change: memory (host or
    GPU), the disk, the network, a process killed from outside. Everything else — a plugin's own
    error, a failed check, a library raising on these inputs — fails the same way again."""
    if isinstance(e, QcompareError):
        return False
    transient = (MemoryError, OSError, ConnectionError, TimeoutError, KeyboardInterrupt)
    if isinstance(e, transient):
        return True
    name = type(e).__name__
    return name in ("OutOfMemoryError", "AcceleratorError") or "out of memory" in str(e).lower()
