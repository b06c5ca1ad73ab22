"""Recipes are strict; plans select the right layers and warn about dead patterns."""

import pytest
import torch
from safetensors.torch import save_file

from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.plan import make_plan
from lyoncompress.recipe import Recipe, parse_size


def test_shipped_recipes_load():
    assert Recipe.from_yaml("configs/demo.yaml").targets == ("fc1", "fc2")
    assert Recipe.from_yaml("configs/minilm-mlp.yaml").budget == 0.5


@pytest.mark.parametrize(
    "text,match",
    [
        ("budjet: 0.5\n", "unknown key 'budjet'"),
        ("budget: half\n", "'budget' must be float"),
        ("depth: 0\n", "depth 0"),
        ("budget: 1.5\n", "budget 1.5"),
        ("targets: ['(']\n", "invalid regular expression"),
        ("layers: {fc1: {methd: lowrank}}\n", "unknown key 'methd'"),
        ("version: 7\n", "version 7"),
        ("refine_sweeps: -1\n", "refine_sweeps"),
        ("- a\n- b\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_key_and_file(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        Recipe.from_yaml(path)
    assert str(path) in str(info.value)


def test_flags_win_over_recipe():
    recipe = Recipe(method="monarch", budget=0.3).replace(budget=0.6, method=None, targets=())
    assert recipe.method == "monarch" and recipe.budget == 0.6


def test_parse_size():
    assert (
        parse_size("5GB") == 5 * 10**9 and parse_size("512KiB") == 512 * 1024 and parse_size("10 mb") == 10**7
    )
    with pytest.raises(InputError):
        parse_size("lots")


@pytest.fixture
def checkpoint(tmp_path):
    state = {
        "embeddings.word_embeddings.weight": torch.zeros(50, 8),
        "layer.0.fc.weight": torch.zeros(8, 8),
        "layer.0.fc.bias": torch.zeros(8),
        "layer.1.fc.weight": torch.zeros(8, 8),
        "layer.0.norm.weight": torch.zeros(8),
        "lm_head.weight": torch.zeros(50, 8),
    }
    save_file(state, tmp_path / "m.safetensors")
    return open_checkpoint(tmp_path / "m.safetensors")


def test_default_selection_skips_embeddings_and_heads(checkpoint):
    plan = make_plan(checkpoint, Recipe())
    assert [layer.name for layer in plan.layers] == ["layer.0.fc", "layer.1.fc"]
    assert plan.layers[0].has_bias and not plan.layers[1].has_bias


def test_targets_ignore_overrides_and_warnings(checkpoint):
    recipe = Recipe(
        targets=(r"re:layer\.\d+\.fc", "nothing.here"),
        ignore=("layer.1.fc",),
        layers=(),
    )
    plan = make_plan(checkpoint, recipe)
    assert [layer.name for layer in plan.layers] == ["layer.0.fc"]
    assert plan.warnings == ["pattern 'nothing.here' matched no 2-D weight"]
    from lyoncompress.recipe import LayerOverride

    plan = make_plan(checkpoint, Recipe(layers=(LayerOverride("layer.1.fc", method="lowrank", budget=0.25),)))
    assert (plan.layers[1].method, plan.layers[1].budget) == ("lowrank", 0.25)
    assert plan.layers[0].method == "auto"


def test_nothing_selected_is_an_error(checkpoint):
    with pytest.raises(InputError, match="no layer selected"):
        make_plan(checkpoint, Recipe(targets=("missing",)))
