"""qcompare: compare ways of quantizing LLMs and of recovering the accuracy they lose."""

from qcompare.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
