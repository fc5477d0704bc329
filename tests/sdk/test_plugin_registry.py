"""Plugin loading: entry points, the QCOMPARE_PLUGINS filter, clashes and typos."""

import pluggy
import pytest
from typer.testing import CliRunner

from qcompare import hookimpl
from qcompare.sdk.api import Quantizer
from qcompare.cli import app
from qcompare.errors import QcompareError
from qcompare.sdk.registry import add_plugin, get_registry, make_plugin_manager, remove_plugin


class Clash:
    """A second plugin offering a quantizer under a name already taken."""

    @hookimpl
    def register_quantizers(self, register):
        class Other(Quantizer):
            name = "rtn"

        register(Other)


def test_builtin_executor_loads_through_its_entry_point(monkeypatch):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local")
    reg = get_registry()
    assert reg.names("executor") == ["local"] and reg.plugins["executor"]["local"].package == "qcompare"


def test_qcompare_plugins_variable_limits_what_loads(monkeypatch):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "")
    reg = get_registry()
    assert all(not reg.names(kind) for kind in reg.plugins)


def test_two_plugins_with_one_name_is_an_error_naming_both(test_plugins):
    clash = Clash()
    add_plugin(clash)
    try:
        with pytest.raises(QcompareError, match=r"two plugins register the quantizer 'rtn': qcompare[-_]rtn and test_plugin_registry"):
            get_registry()
        # the other commands stop at the clash; `plugins` still lists everything so it can be seen
        res = CliRunner().invoke(app, ["validate", "nonexistent.toml"])
        assert res.exit_code == 2 and "Traceback" not in res.output
        res = CliRunner().invoke(app, ["plugins"])
        assert res.exit_code == 2 and "Traceback" not in res.output and "quantizer rtn" in res.output
        [line] = [ln for ln in res.output.splitlines() if "two plugins register" in ln]
        assert line.startswith("error:") and "uninstall one" in line
    finally:
        remove_plugin(clash)


def test_a_misspelled_hook_is_caught(monkeypatch):
    class Typo:
        @hookimpl
        def register_quantizer(self, register):  # missing "s"
            pass

    monkeypatch.setenv("QCOMPARE_PLUGINS", "")
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_quantizer'"):
        make_plugin_manager([Typo()])


def test_plugins_command_lists_parameters_defaults_and_docs(test_plugins):
    res = CliRunner().invoke(app, ["plugins"])
    assert res.exit_code == 0, res.output
    for text in ("quantizer rtn", "Symmetric round-to-nearest", "group_size", "distiller nudge",
                 "evaluator probe", "executor local", "['lm_head']", "entry point 'local'",
                 "entry points loaded (what QCOMPARE_PLUGINS takes): local"):
        assert text in res.output, text


def test_plugins_shows_the_values_a_literal_allows():
    from typing import Annotated, Literal, Optional

    from qcompare.cli import type_text

    assert type_text(Literal["nf4", "fp4"]) == "one of 'nf4', 'fp4'"
    assert type_text(Annotated[Literal[2, 4], "meta"]) == "one of 2, 4"
    assert type_text(Optional[int]) == "int | None" and type_text(list[str]) == "list[str]"


def test_an_unknown_name_lists_each_package_entry_point_with_the_names_it_provides():
    with pytest.raises(QcompareError) as err:
        get_registry().get("quantizer", "gtpq")
    msg = str(err.value)
    assert msg.startswith("unknown quantizer 'gtpq'; known: ") and "(did you mean 'gptq'?)" in msg
    # which entry point of which package provides each name, so a user knows what to install or enable
    assert "awq, gptq (from qcompare, entry point 'llmcompressor')" in msg
    assert "torchao (from qcompare, entry point 'torchao')" in msg
