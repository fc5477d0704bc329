"""The plugin SDK: everything a plugin may use, from this one place.

    from qcompare.sdk import Params, Quantizer, hookimpl

A plugin — built in or published by anyone — imports qcompare only from here (a test holds the
built-in and example plugins to it); every other module of ``qcompare`` is private and may move.
The contract itself, and what the runner promises in return, is ``docs/writing-plugins.md``.

- The hooks and the classes to subclass: ``hookimpl``; ``Quantizer``, ``Distiller``, ``Evaluator``,
  ``Executor``; their ``Params`` (``RuntimeField``, ``AddedField``); what the runner hands them
  (``CellContext``, ``ModelFacts``, ``Items``) and what they hand back (``DistillResult``,
  ``EvalResult``); ``QcompareError`` for anything the user must fix.
- Training-time rounding: ``FakeQuantizer`` and the way distillers find it (``fake_quantizers``,
  ``weight_quantizers``, ``rounded_weights``, ``activation_quantizer``), so a format need not share torchao's class tree to train.
- Which weights to quantize: ``find_targets``, ``unmatched``, ``expert_params``, ``probe_expert_layouts``;
  whether a fake quantizer stands for them (``check_read_in_forward``); the ``skip`` that leaves modules
  float (``skip_patterns``).
- Saving and loading a converted model: ``save_quantized``, ``apply_int_grid``, ``save_int_grid``, ``save_state``,
  ``load_state``; measuring it: ``holds_codes``.
- A cell's files and costs: ``CellFiles``, ``write_json``, ``logical_flops``; optional packages
  (``TRACKERS``, ``installed``, ``require``); the registry (``get_registry``, ``add_plugin`` for a
  plugin defined in a notebook); qcompare's small cache (``read_cache``, ``write_cache``); what a process computes
  once and keeps (``memo``, ``memo_dict``, ``on_clear``; ``clear_all`` forgets it all).
- For a plugin's tests: ``check_quantizer`` (imported on first use, with ``compat``, the fixes some
  exported models need before loading).
"""

from qcompare.errors import QcompareError
from qcompare.results.store import CellFiles, write_json
from qcompare.sdk.api import (AddedField, CellContext, Distiller, DistillResult, EvalResult, Evaluator, Executor,
                              Items, ModelFacts, Params, Plugin, Quantizer, RuntimeField)
from qcompare.sdk.cache import read_cache, write_cache
from qcompare.sdk.cost import logical_flops
from qcompare.sdk.extras import TRACKERS, installed, require
from qcompare.sdk.fake import FakeQuantizer, activation_quantizer, fake_quantizers, rounded_weights, weight_quantizers
from qcompare.sdk.footprint import holds_codes
from qcompare.sdk.hookspecs import hookimpl
from qcompare.sdk.memo import clear_all, memo, memo_dict, on_clear
from qcompare.sdk.registry import add_plugin, get_registry, remove_plugin
from qcompare.sdk.saving import apply_int_grid, load_state, save_int_grid, save_quantized, save_state
from qcompare.sdk.reads import check_read_in_forward
from qcompare.sdk.targets import expert_params, find_targets, probe_expert_layouts, skip_patterns, unmatched

__all__ = [
    "AddedField", "CellContext", "CellFiles", "DistillResult", "Distiller", "EvalResult", "Evaluator", "Executor",
    "FakeQuantizer", "Items", "ModelFacts", "Params", "Plugin", "QcompareError", "Quantizer", "RuntimeField",
    "TRACKERS", "activation_quantizer", "add_plugin", "clear_all", "apply_int_grid", "check_quantizer", "check_read_in_forward", "compat", "expert_params", "fake_quantizers",
    "find_targets", "get_registry", "holds_codes", "hookimpl", "installed", "load_state", "logical_flops", "memo", "memo_dict", "on_clear",
    "probe_expert_layouts", "read_cache", "remove_plugin", "require", "rounded_weights", "save_int_grid", "save_quantized", "save_state", "skip_patterns", "unmatched",
    "weight_quantizers", "write_cache", "write_json",
]


def __getattr__(name: str):
    """``check_quantizer`` and ``compat`` on first use: a plugin that never tests or reloads does not pay
    for their imports (transformers' model classes; patches of torchao and bitsandbytes)."""
    if name == "check_quantizer":
        from qcompare.testing import check_quantizer

        return check_quantizer
    if name == "compat":
        import qcompare.compat

        return qcompare.compat
    raise AttributeError(f"module 'qcompare.sdk' has no attribute {name!r}")
