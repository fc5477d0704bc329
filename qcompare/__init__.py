"""qcompare: compare ways of quantizing LLMs and of recovering the accuracy they lose."""

from qcompare.sdk.hookspecs import hookimpl
from qcompare.version import __version__

__all__ = ["hookimpl", "load_pretrained", "__version__"]


def load_pretrained(folder, device: str | None = None):
    """A model folder qcompare saved (``save_models``, ``export``), loaded as the run evaluated it: through
    the quantizer plugin that saved it when it is in that plugin's own format, else by transformers."""
    from qcompare.sdk.saving import load_pretrained as load

    return load(folder, device)
