"""factorize --min-recovery --max-bytes: the smallest passing artifact must also fit."""

import json

import numpy as np
import pytest

from lyoncompress.checkpoint import tensor_bytes
from lyoncompress.errors import InputError
from lyoncompress.recipe import SearchConfig, recipe_from_dict
from tests.helpers import make_mlp_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("maxbytes")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    data = root / "inputs.npy"
    np.save(data, np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    return ckpt, data


def _args(ckpt, data, out, *extra):
    args = ["factorize", ckpt, "-o", out, "--method", "lowrank", "--min-recovery", "0.5"]
    return [*args, "--eval-task", "outputs", "--eval-data", data, "--search-steps", "4", "--json", *extra]


def test_fitting_artifact_is_written_with_its_size(tmp_path, setup, cli):
    ckpt, data = setup
    result = cli(*_args(ckpt, data, tmp_path / "out", "--max-bytes", "10MB"))
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["budget_search"]
    assert found["passed"] and found["max_bytes"] == 10**7
    assert found["smallest_passing_bytes"] == tensor_bytes(tmp_path / "out")


def test_too_large_artifact_exits_1_and_writes_nothing(tmp_path, setup, cli):
    ckpt, data = setup
    result = cli(*_args(ckpt, data, tmp_path / "out", "--max-bytes", "1KB"))
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)["budget_search"]
    assert not found["passed"] and found["chosen_budget"] is None
    assert found["smallest_passing_bytes"] > 1000 and found["too_large_budget"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_size_and_recipe_key(tmp_path, setup, cli):
    ckpt, data = setup
    result = cli(*_args(ckpt, data, tmp_path / "out", "--max-bytes", "lots"))
    assert result.exit_code == 2 and "--max-bytes" in result.output
    alone = cli("factorize", ckpt, "-o", tmp_path / "out", "--max-bytes", "1MB")
    assert alone.exit_code == 2 and "--min-recovery" in alone.output
    section = recipe_from_dict({"search": {"min_recovery": 0.9, "max_bytes": "40MB"}}, "r.yaml").search
    assert section.max_bytes == "40MB"
    with pytest.raises(InputError):
        SearchConfig(0.9, max_bytes="-1MB")
