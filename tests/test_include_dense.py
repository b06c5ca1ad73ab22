"""quantize --include-dense: the weights left dense (Linear and embedding tables) quantized
too, validated like every layer and loaded back into the model."""

import json

import pytest
import torch
from safetensors import safe_open

from lyoncompress.artifact import load_artifact
from lyoncompress.errors import FormatError, InputError
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.recipe import QuantizeConfig, recipe_from_dict
from lyoncompress.schema import DType, LayerRecord, QuantRecord, Structure
from tests.helpers import make_mlp_checkpoint, random_llama


@pytest.fixture(scope="module")
def factorized(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("incl")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    result = cli("factorize", ckpt, "-o", root / "fact", "--method", "monarch")
    assert result.exit_code == 0, result.output
    return ckpt, root / "fact"


def test_head_left_dense_is_quantized_and_reloads(tmp_path, factorized, cli):
    ckpt, fact = factorized
    out = tmp_path / "q"
    result = cli("quantize", fact, "-o", out, "--format", "int8", "--include-dense", "re:head", "--json")
    assert result.exit_code == 0, result.output
    art = load_artifact(out)
    assert art.layers["head"].structure is Structure.DENSE
    assert art.layers["head"].quantization.format == "int8"
    assert "head.weight" not in art.tensors.infos
    assert art.tensors.infos["head.factors.0.qdata"].shape == (1, 1, 10, 128)
    model = load_compressed(out)
    assert isinstance(model.head, ButterflyLinear)
    exact = load_reference(ckpt).head.weight.detach().double()
    error = (model.head.to_dense().detach().double() - exact).norm() / exact.norm()
    assert float(error) < 0.01
    evaluated = cli("eval", out, "--reference", ckpt, "--task", "weights", "--task", "outputs")
    assert evaluated.exit_code == 0, evaluated.output


def test_without_include_the_artifact_is_unchanged(tmp_path, factorized):
    from lyoncompress.quantization.pipeline import quantize

    _, fact = factorized
    quantize(fact, tmp_path / "a", QuantizeConfig(format="int8"))
    quantize(fact, tmp_path / "b", QuantizeConfig(format="int8", include_dense=("nothing",)))
    a, b = (load_artifact(tmp_path / p) for p in "ab")
    assert list(a.layers) == list(b.layers) == ["fc1", "fc2"]
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_pattern_matching_nothing_warns(tmp_path, factorized, cli):
    _, fact = factorized
    result = cli("quantize", fact, "-o", tmp_path / "q", "--include-dense", "nothing", "--json")
    assert result.exit_code == 0, result.output
    assert any("'nothing' matched no plain 2-D weight" in w for w in json.loads(result.stdout)["warnings"])


def test_bad_pattern_and_recipe_key(tmp_path, factorized, cli):
    _, fact = factorized
    result = cli("quantize", fact, "-o", tmp_path / "q", "--include-dense", "re:(")
    assert result.exit_code == 2
    sections = recipe_from_dict({"quantize": {"include_dense": ["re:head"]}}, "r.yaml")
    assert sections.quantize.include_dense == ("re:head",)
    with pytest.raises(InputError, match="include_dense"):
        recipe_from_dict({"quantize": {"include_dense": "head"}}, "r.yaml")
    with pytest.raises(InputError, match="unknown key 'include_dens'"):
        recipe_from_dict({"quantize": {"include_dens": ["head"]}}, "r.yaml")


def _embedding(**changes):
    fields = {
        "structure": Structure.EMBEDDING,
        "in_features": 8,
        "out_features": 100,
        "chain": ((1, 100, 8, 1),),
        "lowrank_rank": 0,
        "bias": False,
        "dtype": DType.FLOAT32,
        "quantization": QuantRecord("int8", "none", None, 8.0),
    }
    return LayerRecord(**(fields | changes))


@pytest.mark.parametrize(
    "changes", [{"bias": True}, {"chain": ((1, 100, 8, 1), (1, 8, 8, 1))}, {"lowrank_rank": 1}]
)
def test_embedding_record_is_one_plain_table(changes):
    assert _embedding().is_embedding
    with pytest.raises(FormatError, match="one-factor chain"):
        _embedding(**changes)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama") / "model"
    random_llama().save_pretrained(folder)
    return folder


def test_every_weight_with_embeddings_reloads(tmp_path, llama, cli):
    out = tmp_path / "q"
    result = cli("quantize", llama, "-o", out, "--dense", "--include-dense", "re:.*", "--json")
    assert result.exit_code == 0, result.output
    art = load_artifact(out)
    assert art.layers["model.embed_tokens"].structure is Structure.EMBEDDING
    assert art.layers["lm_head"].structure is Structure.DENSE
    with safe_open(out / "model.safetensors", "pt") as f:
        plain = [k for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2]
    assert plain == []  # every matrix is quantized
    model = load_compressed(out)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    reference = load_reference(llama)
    exact = reference.model.embed_tokens.weight.detach()
    error = (model.model.embed_tokens.weight.detach() - exact).norm() / exact.norm()
    assert 0 < float(error) < 0.01
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99
    inspected = cli("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    evaluated = cli("eval", out, "--reference", llama, "--task", "weights")
    assert evaluated.exit_code == 0, evaluated.output


def test_embedding_stored_as_float_is_refused(tmp_path, llama):
    from lyoncompress.quantization.pipeline import quantize

    out = tmp_path / "q"
    quantize(llama, out, QuantizeConfig(dense=True, include_dense=("re:model.embed_tokens",)))
    art = load_artifact(out)
    record = art.layers["model.embed_tokens"]
    assert record.quantization is not None
    with pytest.raises(FormatError, match="only written quantized"):
        from lyoncompress.artifact import _check_tensors

        _check_tensors("model.embed_tokens", LayerRecord(**{**record.__dict__, "quantization": None}), {})
