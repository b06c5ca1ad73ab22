"""Recipes are strict; plans select the right layers and warn about dead patterns."""

import re

import pytest
import torch
from safetensors.torch import save_file

from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.plan import make_plan
from lyoncompress.recipe import (
    DEFAULT_CALIB_SAMPLES,
    EvalConfig,
    Gates,
    QuantizeConfig,
    Recipe,
    RecipeFile,
    SearchConfig,
    load_recipe,
    parse_size,
)


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


SECTIONED = """\
version: 1
factorize:
  targets: [fc1]
  method: lowrank
  budget: 0.3
quantize:
  format: int4
  rescale: left-to-right
  group_size: 16
  calib: builtin
  calib_samples: 512
eval:
  tasks: [weights, outputs]
  data: inputs.npy
  samples: 64
  gates: {max_output_error: 0.5}
search:
  min_recovery: 0.9
  task: outputs
  high: 0.8
  max_steps: 4
"""


def test_sectioned_recipe_loads_every_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(SECTIONED)
    sections = load_recipe(path)
    assert sections.factorize == Recipe(targets=("fc1",), method="lowrank", budget=0.3)
    assert Recipe.from_yaml(path) == sections.factorize
    assert sections.quantize == QuantizeConfig(
        format="int4", rescale="left-to-right", group_size=16, calib="builtin", calib_samples=512
    )
    assert sections.eval == EvalConfig(
        tasks=("weights", "outputs"), data="inputs.npy", samples=64, gates=Gates(max_output_error=0.5)
    )
    assert sections.search == SearchConfig(0.9, task="outputs", high=0.8, max_steps=4)


def test_sections_left_out_have_their_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nquantize: {format: fp8-e4m3}\n")
    sections = load_recipe(path)
    assert sections == RecipeFile(quantize=QuantizeConfig(format="fp8-e4m3"))
    assert sections.search is None


@pytest.mark.parametrize("name", ["configs/demo.yaml", "configs/minilm-mlp.yaml"])
def test_flat_recipe_is_the_factorize_section(name):
    sections = load_recipe(name)
    assert sections == RecipeFile(factorize=Recipe.from_yaml(name))
    assert sections.factorize.budget == 0.5 and sections.search is None


def test_one_calibration_default_for_factorize_and_quantize():
    assert Recipe().calib_samples == QuantizeConfig().calib_samples == DEFAULT_CALIB_SAMPLES


@pytest.mark.parametrize(
    "text,match",
    [
        ("factorize: {budjet: 0.5}\n", "unknown key 'budjet'"),
        ("quantize: {formt: int4}\n", "unknown key 'formt'"),
        ("eval: {task: [weights]}\n", "unknown key 'task'"),
        ("eval: {gates: {min_recover: 0.9}}\n", "unknown key 'min_recover'"),
        ("search: {min_recovery: 0.9, steps: 3}\n", "unknown key 'steps'"),
        ("factorize: {}\nquantise: {format: int4}\n", "unknown key 'quantise'"),
        ("factorize: {}\nbudget: 0.5\n", "unknown key 'budget'"),
        ("version: 2\nfactorize: {}\n", "version 2"),
        ("factorize: {version: 1}\n", "one top-level version"),
        ("quantize: int8\n", "must be a mapping"),
        ("quantize: {group_size: 0}\n", "--group-size"),
        ("quantize: {calib_samples: two}\n", "'calib_samples' must be int"),
        ("quantize: {dense: true, calib: builtin}\n", "--calib needs a factorized artifact"),
        ("eval: {samples: 0}\n", "--samples"),
        ("eval: {tasks: [1]}\n", "'tasks' must be a string"),
        ("search: {task: outputs}\n", "'min_recovery' is required"),
        ("search: {min_recovery: 1.5}\n", "(0, 1]"),
        ("search: {min_recovery: 0.9, task: weights}\n", "no recovery metric"),
    ],
)
def test_bad_sectioned_recipes_name_key_and_file(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(match)) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_flags_win_over_every_section():
    quantize = QuantizeConfig(format="int4", group_size=16).replace(format="int8", group_size=None)
    assert (quantize.format, quantize.group_size) == ("int8", 16)
    evaluation = EvalConfig(samples=64, gates=Gates(min_recovery=0.9)).replace(
        samples=None, tasks=(), max_output_error=0.1, min_recovery=None
    )
    assert evaluation == EvalConfig(samples=64, gates=Gates(min_recovery=0.9, max_output_error=0.1))
    search = SearchConfig(0.9, high=0.8).replace(min_recovery=0.95, low=None)
    assert search == SearchConfig(0.95, high=0.8)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\xff\xfe garbage", "not UTF-8 text"),
        (b"method: [unclosed\n", "not valid YAML (expected ',' or ']'"),
        (b"depth: 100000\n", "depth 100000 must be in 1"),
        (b"depth: 0\n", "depth 0 must be in 1"),
    ],
)
def test_bad_recipe_file_is_one_line(tmp_path, content, message):
    from lyoncompress.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)) as refused:
        load_recipe(path)
    assert "\n" not in str(refused.value)
