"""Built-in evaluators: lm-eval tasks, held-out perplexity and KL to the teacher."""

from qcompare.sdk import hookimpl
from qcompare_plugins.evaluators.harness import LmEvalEvaluator
from qcompare_plugins.evaluators.kl import KLToTeacherEvaluator
from qcompare_plugins.evaluators.perplexity import PerplexityEvaluator


@hookimpl
def register_evaluators(register):
    register(LmEvalEvaluator)
    register(PerplexityEvaluator)
    register(KLToTeacherEvaluator)
