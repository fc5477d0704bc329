"""The whole plugin contract of qcompare: the one page a plugin author reads.

A plugin is a module named by an entry point in the group ``qcompare``.  It implements
any of the hooks below with ``@qcompare.hookimpl``.  Registration hooks receive a
``register`` callable, so one module can offer several things.  pluggy lets an
implementation take fewer arguments than its spec, so these hooks can grow without
breaking plugins.

The classes that plugins register (``Quantizer``, ``Distiller``, ``Evaluator``,
``Executor``) live in :mod:`qcompare.sdk.api`; their docstrings say what each method owes.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("qcompare")
hookimpl = pluggy.HookimplMarker("qcompare")


# --- registration -----------------------------------------------------------------


@hookspec
def register_quantizers(register):
    """Offer quantizers: call ``register(QuantizerSubclass)`` once for each."""


@hookspec
def register_distillers(register):
    """Offer distillers: call ``register(DistillerSubclass)`` once for each."""


@hookspec
def register_evaluators(register):
    """Offer evaluators: call ``register(EvaluatorSubclass)`` once for each."""


@hookspec
def register_executors(register):
    """Offer executors (where cells run): call ``register(ExecutorSubclass)``."""


@hookspec
def register_models(register):
    """Offer local models by short name: ``register(name, folder, description)``.

    ``folder`` is a Hugging Face model folder that ``from_pretrained`` loads; a recipe may
    then say ``models = ["name"]`` instead of a hub id or a path.
    """


@hookspec
def register_datasets(register):
    """Offer local training data by short name: ``register(name, path, description)``.

    ``path`` is a JSONL or Parquet file with a ``messages`` column in chat format.
    """


@hookspec
def register_task_folders(register):
    """Offer folders of lm-eval task YAMLs: ``register(folder)``; evaluators include them."""


# --- lifecycle (for loggers and trackers) -----------------------------------------


@hookspec
def cell_started(cell, cell_dir):
    """Called before a cell runs.

    :param cell: the :class:`qcompare.engine.cells.Cell` about to run.
    :param cell_dir: the folder its results will be written to.
    """


@hookspec
def cell_finished(cell, cell_dir, record, report_to, run_name):
    """Called after a cell ends, whether it succeeded or failed.

    :param record: the dict stored as the cell's ``result.json`` (status, metrics, cost).
    :param report_to: the recipe's experiment trackers (transformers' ``report_to`` names).
    :param run_name: the cell's run name in those trackers, as the distillers' trainers use it.
    """
