"""The no-training row: the quantized student as the quantizer left it (post-training quantization)."""

from __future__ import annotations

from qcompare.sdk import CellContext, Distiller, DistillResult, Params


class NoDistiller(Distiller):
    """No recovery training: evaluate the quantized model as is (post-training quantization)."""

    name = "none"
    Params = Params
    seeded = False

    def keeps_base_weights(self, params) -> bool:
        return True  # nothing trains: the student may sit on the teacher's memory

    def planned_tokens(self, params) -> dict[str, float]:
        return {}

    def distill(self, student, params, context: CellContext) -> DistillResult:
        from .cost import zero_cost

        return DistillResult(student=student, log=[], cost=zero_cost())
