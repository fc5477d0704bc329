"""How a recipe expands into cells, and how cell ids follow their settings."""

from qcompare.engine.cells import expand
from qcompare.engine.recipe import load_recipe

from conftest import BASIC


def cells_of(path, *overrides):
    return expand(load_recipe(path, list(overrides)))


def test_sweep_axes_multiply_and_seedless_cells_run_once(test_plugins, write_recipe):
    cells = cells_of(write_recipe(BASIC), "distillers[1].max_steps=[1,2,3]")
    teacher = [c for c in cells if c.is_teacher]
    keep = [c for c in cells if c.distiller and c.distiller.name == "keep"]
    nudge = [c for c in cells if c.distiller and c.distiller.name == "nudge"]
    assert len(teacher) == 1 and teacher[0].seed is None
    assert len(keep) == 2 and {c.seed for c in keep} == {None}  # once per bit width, not per seed
    assert len(nudge) == 2 * 3 * 2  # bits × steps × seeds
    assert len({c.id for c in cells}) == len(cells)


def test_a_list_valued_parameter_is_a_value_not_a_sweep(test_plugins, write_recipe):
    cells = cells_of(write_recipe(BASIC), 'quantizers[0].skip=["lm_head", "q_proj"]')
    skips = {tuple(c.quantizer.params["skip"]) for c in cells if c.quantizer}
    assert skips == {("lm_head", "q_proj")}
    swept = cells_of(write_recipe(BASIC), 'quantizers[0].skip=[["lm_head"], ["q_proj"]]')
    assert {tuple(c.quantizer.params["skip"]) for c in swept if c.quantizer} == {("lm_head",), ("q_proj",)}


def test_cell_id_is_stable_and_follows_settings(test_plugins, write_recipe):
    path = write_recipe(BASIC)
    first = {c.label(): c.id for c in cells_of(path)}
    assert first == {c.label(): c.id for c in cells_of(path)}
    changed = {c.label(): c.id for c in cells_of(path, "distillers[1].learning_rate=0.5")}
    assert changed.keys() == first.keys()  # labels show only what varies within the recipe
    assert all(changed[k] == v for k, v in first.items() if "nudge" not in k)
    assert all(changed[k] != v for k, v in first.items() if "nudge" in k)
    defaults = {c.id for c in cells_of(path, "distillers[1].learning_rate=0.01")}  # the default, spelled out
    assert defaults == set(first.values())


def test_runtime_parameters_leave_cell_ids_alone(monkeypatch, write_recipe):
    from qcompare.sdk.registry import get_registry

    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,torchao,distillers")
    body = """
models = ["{model}"]
[[quantizers]]
name = "torchao"
[[distillers]]
name = "sft"
max_steps = 2
"""
    assert "save_steps" in get_registry().get("distiller", "sft").Params.model_fields
    path = write_recipe(body)
    ids = {c.id for c in cells_of(path)}
    assert {c.id for c in cells_of(path, "distillers[0].save_steps=7")} == ids
    assert {c.id for c in cells_of(path, "distillers[0].max_steps=3")} != ids
    swept = cells_of(path, "distillers[0].save_steps=[5, 7]")  # one cell: the result cannot differ
    assert {c.id for c in swept} == ids and len(swept) == len(ids)


def test_cell_ids_follow_the_data_file_content_not_its_folder(test_plugins, write_recipe, tmp_path):
    rows = '{"messages": [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]}\n'
    ids = []
    for folder, text in (("a", rows), ("b", rows), ("c", rows * 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(text)
        path = write_recipe(BASIC + f'\n[data]\ntrain = "{tmp_path / folder / "train.jsonl"}"\n', name=f"{folder}.toml")
        ids.append({c.id for c in cells_of(path) if not c.is_teacher})
    assert ids[0] == ids[1]  # the same file moved: the same cells
    assert not ids[0] & ids[2]  # other content: new cells
