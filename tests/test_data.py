"""The built-in offline corpus: a fixed evaluation half, a larger disjoint calibration split."""

import hashlib
import importlib
import inspect
import random
import re
import sys
import time
import warnings

import pytest

from lyoncompress.errors import InputError
from lyoncompress.evaluation.data import CORPUS_MODULES, builtin_corpus

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
    started = time.perf_counter()
    again = builtin_corpus(None, split="calib")
    assert time.perf_counter() - started < 1.0  # the parsed standard library is cached
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
