"""The demo pipeline as CI runs it: gates that pass, and an over-compressed variant that fails."""

import json

from lyoncompress.demo import DEMO_EVAL, DEMO_QUANTIZE, DEMO_RECIPE
from lyoncompress.recipe import Recipe, RecipeFile, load_recipe


def test_demo_recipe_matches_configs_file():
    assert Recipe.from_yaml("configs/demo.yaml") == DEMO_RECIPE
    sections = RecipeFile(factorize=DEMO_RECIPE, quantize=DEMO_QUANTIZE, eval=DEMO_EVAL)
    assert load_recipe("configs/demo-pipeline.yaml") == sections


def test_demo_passes_and_overcompression_fails(tmp_path, cli):
    env = {"LYONCOMPRESS_CACHE": str(tmp_path)}
    result = cli("demo", "--json", env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    accuracy = report["eval"]["tasks"]["classification"]
    assert accuracy["reference_accuracy"] > 0.9  # the demo model really learned the digits
    assert report["eval"]["passed"] and report["quantize"]["format"] == "int8"

    checkpoint, tiny = tmp_path / "demo-mlp", tmp_path / "tiny"
    args = ["factorize", checkpoint, "-o", tiny, "--method", "lowrank", "--budget", "0.01"]
    assert cli(*args, env=env).exit_code == 0
    gated = cli("eval", tiny, "--reference", checkpoint, "--min-recovery", "0.97", env=env)
    assert gated.exit_code == 1, gated.output
    assert "FAIL" in gated.output
