"""End-to-end distillation objectives on a tiny randomly initialised BERT."""

import copy
import math

import pytest
import torch

from lyoncompress.butterfly import lowrank
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import DemoMLP
from lyoncompress.refine.aware import activation_aware_lowrank
from lyoncompress.refine.distill import OBJECTIVES, SCHEDULES, _held_out, default_objective, distill
from tests.helpers import random_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertModel(config).eval()


def _batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 50, (4, 12), generator=gen)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 8:] = 0  # a padded sample: its padded positions must not count
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _compressed(model, rank: int):
    """``model`` with every intermediate.dense replaced by a rank-``rank`` factorization."""
    compressed = copy.deepcopy(model)
    for block in compressed.encoder.layer:
        dense = block.intermediate.dense
        weight = dense.weight.detach()
        twiddles = activation_aware_lowrank(weight, torch.eye(weight.shape[1]), rank)
        chain = lowrank(*weight.shape, rank)
        block.intermediate.dense = ButterflyLinear.from_twiddles(chain, twiddles, dense.bias.detach().clone())
    return compressed


def _brute_layers_objective(compressed, reference, batches, embedding_weight: float) -> float:
    """layers-mse by brute force, plus ``embedding_weight`` x (1 - mean pooled cosine) per batch.

    Each batch's cosine term is weighted by that batch's share of the denominator, as the
    objective sums it; weight 0 is layers-mse itself.
    """
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool()
            ours = compressed(**batch, output_hidden_states=True).hidden_states
            theirs = reference(**batch, output_hidden_states=True).hidden_states
            batch_den = sum(float(ref[keep].square().sum()) for ref in theirs[1:])  # embeddings left out
            num += sum(float((m[keep] - r[keep]).square().sum()) for m, r in zip(ours[1:], theirs[1:]))
            # each sentence's mean over its real tokens, then the cosine
            cosines = [
                torch.nn.functional.cosine_similarity(
                    ours[-1][i][keep[i]].mean(0), theirs[-1][i][keep[i]].mean(0), dim=0
                )
                for i in range(len(keep))
            ]
            num += embedding_weight * batch_den * float(1 - torch.stack(cosines).mean())
            den += batch_den
    return math.sqrt(num / den)


def test_default_objective_by_model_kind(tiny_bert):
    assert default_objective(tiny_bert) == "layers-mse"
    assert default_objective(DemoMLP([8, 6, 4, 2])) == "hidden-mse"
    assert default_objective(random_llama()) == "logits-kl"


def test_layers_mse_is_the_relative_error_of_every_real_hidden_state(tiny_bert):
    compressed = _compressed(tiny_bert, 4)
    batches = _batches(3, 1)
    value = _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, batches)
    assert value == pytest.approx(_brute_layers_objective(compressed, tiny_bert, batches, 0.0), rel=1e-6)
    assert value > 0.01  # rank 4 of 32x64 loses visibly


def test_layers_mse_distillation_lowers_the_held_out_error(tiny_bert):
    compressed = _compressed(tiny_bert, 4)
    # a random tiny model needs a larger step than the default tuned on MiniLM
    calls = []
    result = distill(
        tiny_bert,
        compressed,
        _batches(8, 2),
        _batches(2, 3),
        steps=60,
        lr=3e-3,
        progress=lambda *c: calls.append(c),
    )
    # progress after every step: the best held-out value so far, never rising, ending at the result
    assert [c[:2] for c in calls] == [(i, 60) for i in range(1, 61)]
    bests = [c[2] for c in calls]
    assert bests == sorted(bests, reverse=True) and bests[-1] == result.val_after
    assert result.objective == "layers-mse" and result.lr == 3e-3
    assert result.val_after < 0.7 * result.val_before
    # the model is left in its best held-out state, the one reported
    assert _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, _batches(2, 3)) == pytest.approx(
        result.val_after, rel=1e-6
    )


def test_schedules_rise_then_decay_to_zero():
    steps = 200
    warm = [SCHEDULES["warmup-cosine"](s, steps) for s in range(steps)]
    assert warm[0] == pytest.approx(1 / 20) and warm[19] == pytest.approx(1.0)  # 10% linear warm-up
    assert warm[:20] == sorted(warm[:20]) and warm[19:] == sorted(warm[19:], reverse=True)
    assert warm[-1] < 1e-2
    assert SCHEDULES["cosine"](0, steps) == 1.0 and SCHEDULES["cosine"](100, steps) == pytest.approx(0.5)
    assert {SCHEDULES["constant"](s, steps) for s in range(steps)} == {1.0}
    assert SCHEDULES["warmup-cosine"](0, 1) == 1.0  # one step: no warm-up to speak of


def test_distill_reports_its_schedule_and_held_out_history(tiny_bert):
    compressed = _compressed(tiny_bert, 4)
    result = distill(
        tiny_bert,
        compressed,
        _batches(4, 2),
        _batches(2, 3),
        steps=20,
        lr=3e-3,
        eval_every=10,
        schedule="warmup-cosine",
    )
    assert result.schedule == "warmup-cosine"
    assert [s for s, _ in result.history] == [0, 10, 20]
    assert result.history[0][1] == result.val_before and result.val_after == min(v for _, v in result.history)
    with pytest.raises(ValueError, match="unknown distillation schedule 'linear'; registered: constant"):
        distill(tiny_bert, compressed, _batches(1, 2), _batches(1, 3), steps=1, schedule="linear")


def test_layers_embedding_adds_the_pooled_cosine_distance_to_layers_mse(tiny_bert, monkeypatch):
    from lyoncompress.refine import distill as module

    compressed = _compressed(tiny_bert, 4)
    batches = _batches(3, 1)
    expected = _brute_layers_objective(compressed, tiny_bert, batches, 0.5)
    monkeypatch.setattr(module, "EMBEDDING_WEIGHT", 0.5)
    value = _held_out(OBJECTIVES["layers-embedding"], tiny_bert, compressed, batches)
    assert value == pytest.approx(expected, rel=1e-6)
    monkeypatch.setattr(module, "EMBEDDING_WEIGHT", 0.0)  # weight 0 is layers-mse exactly
    assert _held_out(OBJECTIVES["layers-embedding"], tiny_bert, compressed, batches) == pytest.approx(
        _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, batches), rel=1e-9
    )


def test_layers_embedding_distillation_lowers_both_terms(tiny_bert):
    compressed = _compressed(tiny_bert, 4)
    val = _batches(2, 3)
    mse_before = _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, val)
    result = distill(
        tiny_bert, compressed, _batches(8, 2), val, steps=60, lr=3e-3, objective="layers-embedding"
    )
    assert result.objective == "layers-embedding" and result.val_after < 0.7 * result.val_before
    assert _held_out(OBJECTIVES["layers-embedding"], tiny_bert, compressed, val) == pytest.approx(
        result.val_after, rel=1e-6
    )
    assert _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, val) < 0.8 * mse_before
