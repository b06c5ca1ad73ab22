"""The CLI through typer's CliRunner: exit codes, JSON, nothing written on bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import make_mlp_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    folder, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    return folder


def test_help_for_every_command(cli):
    for command in ([], ["factorize"], ["inspect"], ["eval"], ["demo"], ["quantize"], ["frontier"]):
        result = cli(*command, "--help")
        assert result.exit_code == 0, result.output
        assert "Example" in result.output


def test_factorize_inspect_eval_json(tmp_path, ckpt, cli):
    out = tmp_path / "fact"
    result = cli("factorize", ckpt, "-o", out, "--method", "monarch", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["totals"]["layers"] == 2
    inspected = json.loads(cli("inspect", out, "--json").stdout)
    assert [layer["name"] for layer in inspected["layers"]] == ["fc1", "fc2"]
    assert inspected["layers"][0]["structure"] == "monarch"
    evaluated = cli("eval", out, "--reference", ckpt, "--task", "weights", "--task", "outputs", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert set(json.loads(evaluated.stdout)["tasks"]) == {"weights", "outputs"}


def test_gate_fails_with_exit_1_on_overcompression(tmp_path, ckpt, cli):
    out = tmp_path / "tiny"
    assert cli("factorize", ckpt, "-o", out, "--method", "lowrank", "--budget", "0.02").exit_code == 0
    result = cli("eval", out, "--reference", ckpt, "--task", "outputs", "--max-output-error", "0.01")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_eval_write_report_and_plot(tmp_path, ckpt, cli):
    out = tmp_path / "fact"
    assert cli("factorize", ckpt, "-o", out, "--method", "lowrank").exit_code == 0
    plot = tmp_path / "p.png"
    result = cli("eval", out, "--reference", ckpt, "--task", "weights", "--write-report", "--plot", plot)
    assert result.exit_code == 0, result.output
    assert "eval" in json.loads((out / "report.json").read_text())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _no_output_left(tmp_path, name="out"):
    return not any(p.name == name or p.name.startswith(f".{name}") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "args,match",
    [
        (["factorize", "{tmp}/missing.safetensors", "-o", "{tmp}/out"], "no such file"),
        (["factorize", "{tmp}/model.onnx", "-o", "{tmp}/out"], "unsupported file type"),
        (["factorize", "{ckpt}", "-o", "{tmp}/out", "--target", "("], "invalid regular expression"),
        (["factorize", "{ckpt}", "-o", "{tmp}/out", "--target", "nothing"], "no layer selected"),
        (["factorize", "{ckpt}", "-o", "{tmp}/out", "--method", "magic"], "registered methods"),
        (["factorize", "{ckpt}", "-o", "{tmp}/out", "--budget", "2"], "budget 2"),
        (["factorize", "{ckpt}", "-o", "{tmp}/out", "--recipe", "{tmp}/bad.yaml"], "unknown key"),
        (["factorize", "{tmp}/nan.safetensors", "-o", "{tmp}/out"], "NaN"),
        (["factorize", "{tmp}/trunc.safetensors", "-o", "{tmp}/out"], "truncated"),
        (["inspect", "{ckpt}"], "not a lyoncompress artifact"),
        (["eval", "{tmp}/fact", "--reference", "{other}", "--task", "weights"], "differ"),
        (["eval", "{tmp}/fact", "--reference", "{ckpt}", "--task", "perplexity"], "tasks that do"),
        (["eval", "{tmp}/fact", "--reference", "{ckpt}", "--data", "{tmp}/empty.txt"], "no samples"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, ckpt, args, match, cli):
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "bad.yaml").write_text("budjet: 0.5\n")
    (tmp_path / "empty.txt").write_text("\n")
    state = {"fc.weight": torch.full((4, 4), float("nan"))}
    save_file(state, tmp_path / "nan.safetensors")
    raw = (ckpt / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-100])
    other, _ = make_mlp_checkpoint(tmp_path / "other", seed=1)
    save_file({"fc1.weight": torch.zeros(3, 3)}, other / "model.safetensors")
    assert cli("factorize", ckpt, "-o", tmp_path / "fact", "--method", "lowrank").exit_code == 0
    result = cli(*[a.format(tmp=tmp_path, ckpt=ckpt, other=other) for a in args])
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "Traceback" not in result.output
    assert _no_output_left(tmp_path)


def test_existing_output_needs_force(tmp_path, ckpt, cli):
    out = tmp_path / "fact"
    assert cli("factorize", ckpt, "-o", out, "--method", "lowrank").exit_code == 0
    result = cli("factorize", ckpt, "-o", out, "--method", "lowrank")
    assert result.exit_code == 2 and "--force" in result.output
    assert cli("factorize", ckpt, "-o", out, "--method", "monarch", "--force").exit_code == 0
    assert json.loads((out / "report.json").read_text())["layers"][0]["structure"] == "monarch"


def test_usage_error_is_exit_2(ckpt, cli):
    assert cli("factorize", ckpt).exit_code == 2  # missing -o


RECIPE = """\
version: 1
factorize:
  method: lowrank
  budget: 0.4
quantize:
  format: int4
  rescale: left-to-right
eval:
  tasks: [weights, outputs]
  samples: 32
  gates: {max_output_error: 1.0e-9}
"""


def test_every_verb_reads_its_recipe_section_and_flags_win(tmp_path, ckpt, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    fact, q = tmp_path / "fact", tmp_path / "q"
    result = cli("factorize", ckpt, "-o", fact, "--recipe", recipe, "--budget", "0.3", "--json")
    assert result.exit_code == 0, result.output
    assert {k: json.loads(result.stdout)["recipe"][k] for k in ("method", "budget")} == {
        "method": "lowrank",
        "budget": 0.3,
    }
    result = cli("quantize", fact, "-o", q, "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["format"], report["rescale"]) == ("int4", "left-to-right")
    result = cli("quantize", fact, "-o", tmp_path / "q8", "--recipe", recipe, "--format", "int8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["format"], report["rescale"]) == ("int8", "left-to-right")

    failed = cli("eval", q, "--reference", ckpt, "--recipe", recipe, "--json")
    assert failed.exit_code == 1, failed.output  # the recipe's gate: output error <= 1e-9
    report = json.loads(failed.stdout)
    assert set(report["tasks"]) == {"weights", "outputs"}
    assert report["gates_given"] == {"min_recovery": None, "max_output_error": 1e-9}
    passed = cli("eval", q, "--reference", ckpt, "--recipe", recipe, "--max-output-error", "10", "--json")
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.stdout)["gates_given"]["max_output_error"] == 10
    only = cli("eval", q, "--reference", ckpt, "--recipe", recipe, "--task", "outputs", "--json")
    assert set(json.loads(only.stdout)["tasks"]) == {"outputs"}
    # the recipe's output-error gate cannot be measured by the weights task alone: refused
    unmeasured = cli("eval", q, "--reference", ckpt, "--recipe", recipe, "--task", "weights")
    assert unmeasured.exit_code == 2 and "--max-output-error" in unmeasured.output


def test_flat_recipe_still_drives_factorize_only(tmp_path, ckpt, cli):
    recipe = tmp_path / "flat.yaml"
    recipe.write_text("version: 1\nmethod: lowrank\ntargets: [fc1]\n")
    result = cli("factorize", ckpt, "-o", tmp_path / "fact", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.stdout)["layers"]] == ["fc1"]
    result = cli("quantize", tmp_path / "fact", "-o", tmp_path / "q", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "int8"  # no quantize section: the defaults


def test_recipe_search_section_runs_the_search_unless_budget_is_given(tmp_path, ckpt, cli):
    recipe = tmp_path / "search.yaml"
    recipe.write_text(
        "version: 1\nfactorize: {method: lowrank}\n"
        "search: {min_recovery: 0.5, task: outputs, samples: 32, max_steps: 2}\n"
    )
    result = cli("factorize", ckpt, "-o", tmp_path / "searched", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["budget_search"]
    assert (found["min_recovery"], found["max_steps"], found["passed"]) == (0.5, 2, True)
    result = cli("factorize", ckpt, "-o", tmp_path / "fixed", "--recipe", recipe, "--budget", "0.3", "--json")
    assert result.exit_code == 0, result.output
    assert "budget_search" not in json.loads(result.stdout)
    result = cli("factorize", ckpt, "-o", tmp_path / "bad", "--recipe", recipe, "--min-budget", "0.99")
    assert result.exit_code == 2 and "--min-budget" in result.output


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_bad_recipe_section_exits_2(tmp_path, ckpt, cli, command):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("quantize: {formt: int4}\neval: {sample: 3}\n")
    assert cli("factorize", ckpt, "-o", tmp_path / "fact", "--method", "lowrank").exit_code == 0
    args = ["-o", tmp_path / "q"] if command == "quantize" else ["--reference", ckpt]
    result = cli(command, tmp_path / "fact", *args, "--recipe", recipe)
    assert result.exit_code == 2, result.output
    assert "unknown key" in result.output and str(recipe) in " ".join(result.output.split())


def test_inspect_artifact_is_what_inspect_prints(tmp_path, ckpt, cli):
    from lyoncompress.inspection import inspect_artifact

    out = tmp_path / "fact"
    assert cli("factorize", ckpt, "-o", out, "--method", "monarch").exit_code == 0
    assert json.loads(cli("inspect", out, "--json").stdout) == inspect_artifact(out)
