"""Artifacts written before the layered redesign (commit a4f7632) still load, and give
exactly the outputs that version computed from them."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lyoncompress.artifact import load_artifact
from lyoncompress.models import load_compressed

FIXTURES = Path(__file__).parent / "fixtures" / "format-v1"


@pytest.mark.parametrize(
    "name, structure",
    [("calib", "lowrank-aware"), ("q4", "hybrid"), ("dense", "dense")],
)
def test_old_artifact_loads_and_computes_what_it_did(name, structure):
    expected = load_file(FIXTURES / "outputs.safetensors")
    assert {record.structure.value for record in load_artifact(FIXTURES / name).layers.values()} == {
        structure
    }
    with torch.no_grad():
        outputs = load_compressed(FIXTURES / name)(expected["inputs"])
    assert torch.equal(outputs, expected[name])
