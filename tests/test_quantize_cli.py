"""quantize through the CLI: formats end to end, reload, and refusals."""

import json

import numpy as np
import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed
from tests.helpers import make_mlp_checkpoint


@pytest.fixture(scope="module")
def factorized(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("q")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    result = cli("factorize", ckpt, "-o", root / "fact", "--method", "monarch")
    assert result.exit_code == 0, result.output
    return ckpt, root / "fact"


@pytest.mark.parametrize(
    "fmt,dtype", [("int8", torch.int8), ("int4", torch.uint8), ("fp8-e4m3", torch.float8_e4m3fn)]
)
def test_quantize_stores_low_bit_payloads_and_reloads(tmp_path, factorized, fmt, dtype, cli):
    ckpt, fact = factorized
    out = tmp_path / "q"
    result = cli("quantize", fact, "-o", out, "--format", fmt, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for row in report["layers"]:
        # the rescaling never loses to round-to-nearest on the same factors
        assert row["rel_error"] <= row["rtn_rel_error"] * 1.0001
    art = load_artifact(out)
    assert art.tensors.infos["fc1.factors.0.qdata"].dtype == dtype
    assert "fc1.factors.0.twiddle" not in art.tensors.infos
    assert art.layers["fc1"].quantization.format == fmt
    model = load_compressed(out)
    assert isinstance(model.fc1, ButterflyLinear)
    reference = load_compressed(fact)
    approx, exact = model.fc2.to_dense().detach(), reference.fc2.to_dense().detach()
    error = (approx - exact).norm() / exact.norm()
    assert float(error) == pytest.approx(report["layers"][1]["rel_error"], rel=1e-3)
    inspected = json.loads(cli("inspect", out, "--json").stdout)
    assert inspected["layers"][0]["bits"] == report["layers"][0]["bits_per_weight"]
    evaluated = cli("eval", out, "--reference", ckpt, "--task", "weights", "--task", "outputs")
    assert evaluated.exit_code == 0, evaluated.output


def test_quantize_dense_checkpoint(tmp_path, factorized, cli):
    ckpt, _ = factorized
    assert cli("quantize", ckpt, "-o", tmp_path / "q").exit_code == 2
    result = cli("quantize", ckpt, "-o", tmp_path / "q", "--dense", "--format", "int8")
    assert result.exit_code == 0, result.output
    assert load_artifact(tmp_path / "q").layers["fc1"].structure == "dense"
    assert isinstance(load_compressed(tmp_path / "q").fc2, ButterflyLinear)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--format", "int3"], "int8"),
        (["--format", "int8", "--group-size", "7"], "divide"),
        (["--format", "int8", "--rescale", "magic"], "left-to-right"),
    ],
)
def test_bad_quantize_options_exit_2(tmp_path, factorized, args, match, cli):
    _, fact = factorized
    result = cli("quantize", fact, "-o", tmp_path / "q", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not any(p.name.startswith((".q", "q")) for p in tmp_path.iterdir())


def test_quantizing_twice_is_refused(tmp_path, factorized, cli):
    _, fact = factorized
    assert cli("quantize", fact, "-o", tmp_path / "q1").exit_code == 0
    result = cli("quantize", tmp_path / "q1", "-o", tmp_path / "q2")
    assert result.exit_code == 2 and "already quantized" in result.output


def test_quantize_with_calibration_reports_held_out_output_error(tmp_path, factorized, cli):
    ckpt, fact = factorized
    out = tmp_path / "q"
    result = cli("quantize", fact, "-o", out, "--format", "int4", "--calib", "builtin", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calib"] == "builtin" and report["rescale"] == "auto"  # no equalize+ with data
    reference = load_compressed(fact)
    model = load_compressed(out)
    for row in report["layers"]:
        assert row["calib_rows"] > 0 and row["held_out_rows"] > 0
        # measured on this MLP: 0.06 vs 0.12-0.13 for round-to-nearest
        assert row["output_error"] < 0.75 * row["rtn_output_error"]
        exact = getattr(reference, row["name"]).to_dense().detach().double()
        approx = getattr(model, row["name"]).to_dense().detach().double()
        assert float((approx - exact).norm() / exact.norm()) == pytest.approx(row["rel_error"], rel=1e-3)


def test_calibrated_output_error_matches_the_reloaded_model(tmp_path, factorized, cli):
    # the held-out error in the report is what the stored factors do to fresh inputs:
    # recompute it from the inputs of fc2 in the factorized model on data of the same kind
    _, fact = factorized
    data = tmp_path / "calib.npy"
    gen = torch.Generator().manual_seed(0)
    np.save(data, torch.rand(512, 64, generator=gen).numpy())
    out = tmp_path / "q"
    result = cli("quantize", fact, "-o", out, "--format", "int8", "--calib", data, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["layers"][0]
    exact = load_compressed(fact).fc1.to_dense().detach().double()
    approx = load_compressed(out).fc1.to_dense().detach().double()
    rows = torch.from_numpy(np.load(data)).double()
    held = torch.cat((rows[192:256], rows[448:512]))  # every 4th batch of 64 is held out
    expected = (held @ (approx - exact).T).norm() / (held @ exact.T).norm()
    assert row["output_error"] == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing.npy", "no such file"),
        (lambda d: _save(d / "wide.npy", torch.rand(512, 65)), "features"),
        (lambda d: _save(d / "few.npy", torch.rand(100, 64)), "held-out"),
    ],
)
def test_bad_calibration_data_exits_2_and_writes_nothing(tmp_path, factorized, make, match, cli):
    _, fact = factorized
    data = make(tmp_path)
    result = cli("quantize", fact, "-o", tmp_path / "q", "--calib", data)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not any(p.name.startswith((".q", "q")) for p in tmp_path.iterdir())


def test_calibration_of_a_dense_checkpoint_is_refused(tmp_path, factorized, cli):
    ckpt, _ = factorized
    result = cli("quantize", ckpt, "-o", tmp_path / "q", "--dense", "--calib", "builtin")
    assert result.exit_code == 2 and "--calib needs a factorized artifact" in result.output


def _save(path, tensor):
    np.save(path, tensor.numpy())
    return path
