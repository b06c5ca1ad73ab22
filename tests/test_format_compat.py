"""Artifacts written before the layered redesign (commit a4f7632) still load, and give
the outputs that version computed from them, to float32 rounding (today's CPU routes and
the bias add sum in another order than that version's einsum)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lyoncompress import kernels
from lyoncompress.artifact import load_artifact
from lyoncompress.models import load_compressed

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
