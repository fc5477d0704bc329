"""Built-in distillers: ``none`` (post-training quantization), ``sft`` and ``gkd`` (TRL)."""

from qcompare.sdk import hookimpl

from .gkd import GKDDistiller
from .none import NoDistiller
from .sft import SFTDistiller


@hookimpl
def register_distillers(register):
    register(NoDistiller)
    register(SFTDistiller)
    register(GKDDistiller)
