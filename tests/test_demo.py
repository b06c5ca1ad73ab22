"""The demo pipeline as CI runs it: gates that pass, and an over-compressed variant that fails."""

import json

from typer.testing import CliRunner

from lyoncompress.cli import app
from lyoncompress.demo import DEMO_RECIPE
from lyoncompress.recipe import Recipe

runner = CliRunner()


def test_demo_recipe_matches_configs_file():
    assert Recipe.from_yaml("configs/demo.yaml") == DEMO_RECIPE


def test_demo_passes_and_overcompression_fails(tmp_path):
    env = {"CI": "true", "LYONCOMPRESS_CACHE": str(tmp_path)}
    result = runner.invoke(app, ["demo", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    accuracy = report["eval"]["tasks"]["classification"]
    assert accuracy["reference_accuracy"] > 0.9  # the demo model really learned the digits
    assert report["eval"]["passed"] and report["quantize"]["format"] == "int8"

    checkpoint, tiny = tmp_path / "demo-mlp", tmp_path / "tiny"
    args = ["factorize", str(checkpoint), "-o", str(tiny), "--method", "lowrank", "--budget", "0.01"]
    assert runner.invoke(app, args, env=env).exit_code == 0
    gated = runner.invoke(
        app, ["eval", str(tiny), "--reference", str(checkpoint), "--min-recovery", "0.97"], env=env
    )
    assert gated.exit_code == 1, gated.output
    assert "FAIL" in gated.output
