"""eval never lies: unmeasurable or impossible gates, non-finite results and bad data files."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import SIZES, make_mlp_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("eval")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    assert cli("factorize", ckpt, "-o", root / "fact", "--method", "lowrank").exit_code == 0
    return ckpt, root / "fact"


def _eval(cli, models, *args):
    ckpt, fact = models
    return cli("eval", fact, "--reference", ckpt, *args)


def _one_line(result, code, *words):
    assert result.exit_code == code, result.output
    if code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in result.output, result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "weights", "--min-recovery", "0.99"], ["--min-recovery", "no selected task"]),
        (["--task", "outputs", "--min-recovery", "0.5"], ["classification"]),
        (["--task", "classification", "--max-output-error", "0.1"], ["--task outputs"]),
        (["--min-recovery", "2"], ["(0, 1]"]),
        (["--min-recovery", "0"], ["(0, 1]"]),
        (["--max-output-error", "-1"], [">= 0"]),
    ],
)
def test_gate_that_cannot_be_measured_or_met_is_refused(cli, models, args, words):
    _one_line(_eval(cli, models, *args), 2, *words)


def test_non_finite_outputs_fail_every_gate(cli, models, tmp_path):
    # finite inputs whose products overflow float32: logits become inf - inf = NaN, which
    # still have an argmax, so without the check they would count as predictions
    x = np.full((40, SIZES[0]), 3e38, dtype=np.float32)
    np.savez(tmp_path / "huge.npz", x=x, y=np.zeros(40, dtype=np.int64))
    result = _eval(
        cli, models, "--task", "classification", "--data", tmp_path / "huge.npz", "--min-recovery", "0.01"
    )
    _one_line(result, 1, "non-finite", "every gate fails")
    report = _eval(cli, models, "--task", "classification", "--data", tmp_path / "huge.npz", "--json")
    assert report.exit_code == 1  # NaN metrics fail the evaluation even without a gate


def _object_npy(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _truncated_npy(path):
    np.save(path, np.zeros((10, SIZES[0]), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:200])


def _wrong_width_npy(path):
    np.save(path, np.zeros((10, SIZES[0] + 3), dtype=np.float32))


def _nan_npy(path):
    x = np.zeros((10, SIZES[0]), dtype=np.float32)
    x[3, 4] = np.nan
    np.save(path, x)


def _corrupt_safetensors(path):
    save_file({"inputs": torch.zeros(10, SIZES[0])}, path)
    raw = bytearray(path.read_bytes())
    raw[10:20] = b"\xff" * 10
    path.write_bytes(bytes(raw))


def _labels_mismatch_npz(path):
    np.savez(path, x=np.zeros((10, SIZES[0]), dtype=np.float32), y=np.zeros(7, dtype=np.int64))


def _binary_txt(path):
    path.write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize(
    "make, name, words",
    [
        (_object_npy, "obj.npy", ["unreadable"]),
        (_truncated_npy, "cut.npy", ["unreadable"]),
        (_wrong_width_npy, "wide.npy", ["do not fit the model"]),
        (_nan_npy, "nan.npy", ["NaN"]),
        (_corrupt_safetensors, "bad.safetensors", ["safetensors"]),
        (_labels_mismatch_npz, "y.npz", ["10 integer labels"]),
        (_binary_txt, "bin.txt", ["UTF-8"]),
    ],
)
def test_bad_data_file_is_one_line_exit_2(cli, models, tmp_path, make, name, words):
    path = tmp_path / name
    make(path)
    task = "embeddings" if name.endswith(".txt") else "outputs"
    _one_line(_eval(cli, models, "--task", task, "--data", path), 2, *words)
