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
