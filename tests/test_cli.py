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
    for command in ([], ["factorize"], ["inspect"], ["eval"], ["demo"], ["quantize"]):
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
