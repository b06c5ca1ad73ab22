"""The built-in offline corpus: a fixed evaluation half, a larger disjoint calibration split."""

import hashlib
import importlib
import inspect
import random
import re
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyoncompress import data as data_module
from lyoncompress.data import CORPUS_MODULES, builtin_corpus, regrouped_by_length
from lyoncompress.errors import InputError

# the eval half every recorded number in benchmarks/RESULTS.md was measured on:
# (count, sha256 of the sentences joined by newlines), per Python version (docstrings differ)
EVAL_HALF = {
    (3, 11): (928, "5b4f5ef96901a635f155cc979872e9c2ff21c1dc6d12623a9033ef6d19ae3051"),
}


def _original_eval_half(seed: int) -> list[str]:
    """``builtin_corpus(None, seed, "eval")`` as first written, before the calib split grew."""
    sentences: set[str] = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                wanted = inspect.isclass(obj) or inspect.isfunction(obj) or obj is module
                doc = inspect.getdoc(obj) if wanted else None
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 40 <= len(sentence) <= 300 and sentence[0].isupper() and ">>>" not in sentence:
                    sentences.add(sentence)
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    return ordered[1::2]


@pytest.mark.skipif(
    sys.version_info[:2] not in EVAL_HALF, reason="eval half pinned for other Python versions only"
)
def test_eval_half_is_pinned():
    count, digest = EVAL_HALF[sys.version_info[:2]]
    texts = builtin_corpus(None, split="eval")
    assert len(texts) == count
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == digest


@pytest.mark.parametrize("seed", [0, 5])
def test_eval_half_vs_original_algorithm(seed):
    assert builtin_corpus(None, seed, split="eval") == _original_eval_half(seed)


@pytest.mark.parametrize("seed", [0, 5])
def test_calib_split_extends_the_module_half_without_eval_text(seed):
    modules_only = builtin_corpus(None, seed, split="calib", extended=False)
    calib = builtin_corpus(None, seed, split="calib")
    evaluation = builtin_corpus(None, seed, split="eval")
    assert len(modules_only) == len(evaluation)  # the two halves of the module sentences
    assert calib[: len(modules_only)] == modules_only  # calibration starts as it always did
    assert len(calib) > 10 * len(modules_only)
    assert len(set(calib)) == len(calib)
    assert set(calib).isdisjoint(evaluation)
    assert set(modules_only).isdisjoint(evaluation)


def test_calib_split_is_deterministic_seeded_and_cached():
    first = builtin_corpus(None, split="calib")
    first.append("changed by the caller")
    parsed = data_module._stdlib_sentences.cache_info().misses
    again = builtin_corpus(None, split="calib")
    assert data_module._stdlib_sentences.cache_info().misses == parsed  # the standard library is parsed once
    assert again == first[:-1]
    other = builtin_corpus(None, 1, split="calib")  # another seed: other halves, same sentences
    assert other[:100] != again[:100]
    everything = set(again) | set(builtin_corpus(None, split="eval"))
    assert set(other) | set(builtin_corpus(None, 1, split="eval")) == everything
    assert builtin_corpus(10, split="calib") == again[:10]


def test_unknown_split_and_too_many_sentences_are_refused():
    with pytest.raises(InputError, match="unknown corpus split 'train'; use one of eval, calib"):
        builtin_corpus(10, split="train")
    size = len(builtin_corpus(None, split="eval"))
    with pytest.raises(InputError, match=f"has {size} eval sentences"):
        builtin_corpus(size + 1, split="eval")


def _padded_batches(lengths: list[list[int]], left: bool, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Tokenizer-like batches: each sample's ids are ``100 * sample + position`` so that
    samples can be recognised after regrouping."""
    batches, sample = [], 0
    for batch_lengths in lengths:
        width = max(batch_lengths)
        ids = torch.full((len(batch_lengths), width), pad_id)
        mask = torch.zeros(len(batch_lengths), width, dtype=torch.long)
        types = torch.zeros(len(batch_lengths), width, dtype=torch.long)
        for row, n in enumerate(batch_lengths):
            span = slice(width - n, width) if left else slice(0, n)
            ids[row, span] = 100 * sample + torch.arange(n)
            mask[row, span] = 1
            types[row, span] = sample % 2
            sample += 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return batches


def _samples(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    out = []
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            keep = batch["attention_mask"][row].bool()
            out.append(
                (
                    tuple(batch["input_ids"][row][keep].tolist()),
                    tuple(batch["token_type_ids"][row][keep].tolist()),
                )
            )
    return sorted(out)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(1, 20), min_size=1, max_size=6), min_size=1, max_size=8),
    left=st.booleans(),
    batch_size=st.integers(1, 7),
    seed=st.integers(0, 3),
)
def test_regrouped_by_length_keeps_every_sample_and_its_padding(lengths, left, batch_size, seed):
    pad_id = 7
    batches = _padded_batches(lengths, left, pad_id)
    regrouped = regrouped_by_length(batches, batch_size, seed)
    assert _samples(regrouped) == _samples(batches)
    count = sum(len(b) for b in lengths)
    assert [len(b["input_ids"]) for b in regrouped if len(b["input_ids"]) != batch_size] in (
        [],
        [count % batch_size],
    )
    # without padding in the given batches neither side nor pad id can be told: right, 0
    if not any(len(set(b)) > 1 for b in lengths):
        left, pad_id = False, 0
    spans = []
    for batch in regrouped:
        mask = batch["attention_mask"].bool()
        assert mask.any(dim=1).all()
        real = mask.sum(dim=1)
        assert mask.shape[1] == int(real.max())  # no all-padding column
        spans.append((int(real.min()), int(real.max())))
        for row, n in enumerate(real.tolist()):
            expected = (
                torch.arange(mask.shape[1]) >= mask.shape[1] - n if left else torch.arange(mask.shape[1]) < n
            )
            assert torch.equal(mask[row], expected)  # the padding side is kept
            assert (batch["input_ids"][row][~mask[row]] == pad_id).all()  # and the pad id
    # sorted groups: no two batches' length ranges overlap beyond a shared end
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    again = regrouped_by_length(batches, batch_size, seed)  # seeded: the same batches again
    assert len(again) == len(regrouped)
    assert all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(regrouped, again))


def test_regrouped_batches_give_each_sample_the_same_model_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertModel(config).eval()
    batches = _padded_batches([[3, 9, 5], [12, 2], [7, 7, 1, 4]], left=False, pad_id=0)
    for batch in batches:
        # into the vocabulary; 100 is 6 mod 47, so the samples keep distinct ids
        batch["input_ids"] = batch["input_ids"] % 47 + 1
    regrouped = regrouped_by_length(batches, 3)

    def outputs(batch_list):
        rows = {}
        with torch.no_grad():
            for batch in batch_list:
                hidden = model(**batch).last_hidden_state
                for row in range(len(hidden)):
                    keep = batch["attention_mask"][row].bool()
                    key = (
                        tuple(batch["input_ids"][row][keep].tolist()),
                        tuple(batch["token_type_ids"][row][keep].tolist()),
                    )
                    rows[key] = hidden[row][keep]
        return rows

    before, after = outputs(batches), outputs(regrouped)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-5)
