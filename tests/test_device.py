"""factorize --device cpu|cuda|auto: where the calibrated steps run."""

import json

import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.errors import InputError
from lyoncompress.factorization import calibrated
from lyoncompress.factorization.calibrated import DEVICE_RESOLVERS, resolve_device
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.recipe import DEVICES, Recipe, recipe_from_dict
from tests.helpers import Killed, assert_same_artifact, dying_after, make_mlp_checkpoint

FAST = {"calib": "builtin", "refine_steps": 5, "calib_samples": 256}


def test_recipe_devices_are_the_resolvable_ones():
    assert set(DEVICES) == set(DEVICE_RESOLVERS)
    assert Recipe().device == "auto"
    assert recipe_from_dict({"factorize": {"device": "cpu"}}, "r.yaml").factorize.device == "cpu"
    with pytest.raises(InputError, match="device 'gpu' is unknown; choose one of auto, cpu, cuda"):
        Recipe(device="gpu")


def test_auto_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_cuda_without_a_gpu_exits_2_before_any_work(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--calib", "builtin", "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "--device cuda" in result.output and len(result.output.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_cpu_device_is_the_default_result_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    for name, device in (("auto", "auto"), ("cpu", "cpu")):
        factorize(ckpt, tmp_path / name, Recipe(**FAST, sequential=True, device=device))
    auto, cpu = load_artifact(tmp_path / "auto"), load_artifact(tmp_path / "cpu")
    for name in auto.tensors.names():
        assert torch.equal(auto.load(name), cpu.load(name)), name


def test_capture_keeps_grams_on_the_model_device(tmp_path, monkeypatch):
    """The capture follows the model: moments are float64 where its parameters are."""
    seen = []
    real = calibrated.calibrated_layer

    def spy(weight, layer, calibration, *args, **kwargs):
        seen.append((weight.device, calibration.gram_train.device, calibration.gram_train.dtype))
        return real(weight, layer, calibration, *args, **kwargs)

    monkeypatch.setattr(calibrated, "calibrated_layer", spy)
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    factorize(ckpt, tmp_path / "out", Recipe(**FAST, device="cpu"))
    assert seen and all(s == (torch.device("cpu"), torch.device("cpu"), torch.float64) for s in seen)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "options",
    [{}, {"sequential": True}, {"allocate": "sensitivity"}, {"distill_steps": 4}, {"refine_sweeps": 2}],
    ids=["plain", "sequential", "allocated", "distilled", "sweeps"],
)
def test_cuda_matches_cpu_closely(tmp_path, options):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    reports = {
        device: factorize(ckpt, tmp_path / device, Recipe(**FAST, **options, device=device))
        for device in ("cpu", "cuda")
    }
    for cpu_row, cuda_row in zip(reports["cpu"]["layers"], reports["cuda"]["layers"]):
        assert cpu_row["structure"] == cuda_row["structure"]
        assert cuda_row["output_error"] == pytest.approx(cpu_row["output_error"], rel=0.05, abs=1e-4)
    json.dumps(reports["cuda"])  # nothing on the GPU leaked into the report
    for name in load_artifact(tmp_path / "cuda").tensors.names():
        assert load_artifact(tmp_path / "cuda").load(name).device.type == "cpu"


@pytest.mark.cuda
def test_cuda_run_resumes_to_the_uninterrupted_artifact(tmp_path, monkeypatch):
    """Resumed on the same GPU, a sequential run writes the uninterrupted artifact (the
    remaining fits see the journaled factors swapped in, as the uninterrupted run did)."""
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    recipe = Recipe(**FAST, sequential=True, device="cuda")
    factorize(ckpt, tmp_path / "whole", recipe)
    dying_after(monkeypatch, calibrated, "calibrated_layer", layers=1)
    with pytest.raises(Killed):
        factorize(ckpt, tmp_path / "out", recipe)
    monkeypatch.undo()
    factorize(ckpt, tmp_path / "out", recipe, resume=True)
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")
