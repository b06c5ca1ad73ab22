"""Random corruption of every input a user hands us: never a traceback (exit 3), and never
a written artifact unless the command succeeded.

Artifact corruption has its own property tests in tests/test_schema.py; these cover the
checkpoint, the recipe and the data file, on tiny inputs (seconds).
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import SIZES, make_mlp_checkpoint

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    assert cli("factorize", ckpt, "-o", root / "fact", "--method", "lowrank").exit_code == 0
    np.save(root / "x.npy", np.random.default_rng(0).random((32, SIZES[0]), dtype=np.float32))
    (root / "recipe.yaml").write_text("method: lowrank\nbudget: 0.25\ntargets: [fc1]\n")
    return root


def _flipped(raw: bytes, changes) -> bytes:
    data = bytearray(raw)
    for where, xor in changes:
        data[int(where * len(data))] ^= xor
    return bytes(data)


def _run_on_copy(cli, inputs, name, edit, command):
    """Copy ``inputs`` to a scratch folder, corrupt file ``name`` with ``edit``, run ``command``."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(shutil.copytree(inputs, Path(scratch) / "in"))
        path = root / name
        path.write_bytes(edit(path.read_bytes()))
        out = Path(scratch) / "out"
        result = cli(*command(root, out))
        assert result.exit_code in (0, 1, 2), result.output
        if result.exit_code != 0:
            assert not out.exists(), result.output
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 or (len(lines) == 1 and lines[0].startswith("error: ")), (
                result.output
            )


@FUZZ
@given(changes=flips)
def test_corrupted_checkpoint(cli, inputs, changes):
    _run_on_copy(
        cli,
        inputs,
        "ckpt/model.safetensors",
        lambda raw: _flipped(raw, changes),
        lambda root, out: ["factorize", root / "ckpt", "-o", out, "--method", "lowrank"],
    )


@FUZZ
@given(keep=st.floats(0, 1, exclude_max=True))
def test_truncated_checkpoint(cli, inputs, keep):
    _run_on_copy(
        cli,
        inputs,
        "ckpt/model.safetensors",
        lambda raw: raw[: int(keep * len(raw))],
        lambda root, out: ["factorize", root / "ckpt", "-o", out],
    )


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_recipe(cli, inputs, content):
    _run_on_copy(
        cli,
        inputs,
        "recipe.yaml",
        lambda raw: content,
        lambda root, out: ["factorize", root / "ckpt", "-o", out, "--recipe", root / "recipe.yaml"],
    )


@FUZZ
@given(changes=flips)
def test_corrupted_data_file(cli, inputs, changes):
    _run_on_copy(
        cli,
        inputs,
        "x.npy",
        lambda raw: _flipped(raw, changes),
        lambda root, out: [
            "eval",
            root / "fact",
            "--reference",
            root / "ckpt",
            "--task",
            "outputs",
            "--data",
            root / "x.npy",
        ],
    )
