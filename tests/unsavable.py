"""A quantizer that declares, in one line, that it cannot be saved: the example RTN otherwise. Tests of
the runner, the report and the plugin-testing helper register it in-process."""

from __future__ import annotations

import qcompare_rtn

from qcompare import hookimpl
from qcompare.errors import QcompareError

REFUSAL = "unsavable: this variant has no on-disk format"


class UnsavableRTN(qcompare_rtn.RTNQuantizer):
    """RTN whose save refuses."""

    name = "unsavable"

    def save(self, model, params, folder, context):
        raise QcompareError(REFUSAL)


@hookimpl
def register_quantizers(register):
    register(UnsavableRTN)
