"""Artifacts written before the layered redesign (commit a4f7632) still load, and give
the outputs that version computed from them, to float32 rounding (today's CPU routes and
the bias add sum in another order than that version's einsum). They are format version 1,
which has no ``P.weight`` placeholders; every artifact written today is version 2."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lyoncompress import kernels
from lyoncompress.artifact import PLACEHOLDER, load_artifact, placeholder_name
from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.inspection import inspect_artifact
from lyoncompress.models import load_compressed
from lyoncompress.quantization.pipeline import quantize
from lyoncompress.recipe import QuantizeConfig

FIXTURES = Path(__file__).parent / "fixtures" / "format-v1"


@pytest.mark.parametrize(
    "name, structure",
    [("calib", "lowrank-aware"), ("q4", "hybrid"), ("dense", "dense")],
)
def test_old_artifact_loads_and_computes_what_it_did(name, structure, monkeypatch):
    expected = load_file(FIXTURES / "outputs.safetensors")
    records = load_artifact(FIXTURES / name).layers.values()
    assert {record.structure.value for record in records} == {structure}
    with torch.no_grad():
        routed = load_compressed(FIXTURES / name)(expected["inputs"])
        monkeypatch.setenv(kernels.ENV_VAR, "torch")
        reference = load_compressed(FIXTURES / name)(expected["inputs"])
    for outputs in (routed, reference):
        torch.testing.assert_close(outputs, expected[name], rtol=1e-5, atol=1e-6)


def test_quantizing_an_old_artifact_writes_version_2(tmp_path):
    out = tmp_path / "q"
    quantize(FIXTURES / "calib", out, QuantizeConfig(format="int8"))
    old, new = load_artifact(FIXTURES / "calib"), load_artifact(out)
    assert (old.format_version, new.format_version) == (1, 2)
    stored_old, stored_new = open_checkpoint(FIXTURES / "calib").infos, open_checkpoint(out).infos
    assert all(stored_new[placeholder_name(name)] == PLACEHOLDER for name in new.layers)
    assert not any(placeholder_name(name) in stored_old for name in old.layers)
    assert (
        inspect_artifact(out)["totals"]["params_after"]
        == inspect_artifact(FIXTURES / "calib")["totals"]["params_after"]
    )
    expected = load_file(FIXTURES / "outputs.safetensors")
    with torch.no_grad():
        outputs = load_compressed(out)(expected["inputs"])
    # int8 rounding of the float layers: 0.3% here
    assert float((outputs - expected["calib"]).norm() / expected["calib"].norm()) < 0.01
