"""What a cell computed, counted one way for everyone: the distillers report it, ``qcompare plan``
estimates it before the run (qcompare.engine.estimate) with the same formula."""

from __future__ import annotations


def logical_flops(student_params: float, teacher_params: float, tokens: dict) -> float:
    """6·N per trained token, 2·N per forward token (the teacher's, and every token through
    ``generate`` by the model that generates it, KV cache assumed); attention ignored."""
    get = lambda k: float(tokens.get(k, 0) or 0)  # noqa: E731
    return (6 * student_params * get("student_tokens") + 2 * teacher_params * get("teacher_tokens")
            + 2 * student_params * get("student_rollout_tokens") + 2 * teacher_params * get("teacher_rollout_tokens"))
