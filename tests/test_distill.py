"""End-to-end distillation objectives on a tiny randomly initialised BERT."""

import copy
import math

import pytest
import torch

from lyoncompress.butterfly import lowrank
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import DemoMLP
from lyoncompress.refine.aware import activation_aware_lowrank
from lyoncompress.refine.distill import OBJECTIVES, _held_out, default_objective, distill
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


def test_default_objective_by_model_kind(tiny_bert):
    assert default_objective(tiny_bert) == "layers-mse"
    assert default_objective(DemoMLP([8, 6, 4, 2])) == "hidden-mse"
    assert default_objective(random_llama()) == "logits-kl"


def test_layers_mse_is_the_relative_error_of_every_real_hidden_state(tiny_bert):
    compressed = _compressed(tiny_bert, 4)
    batches = _batches(3, 1)
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool()
            ours = compressed(**batch, output_hidden_states=True).hidden_states
            theirs = tiny_bert(**batch, output_hidden_states=True).hidden_states
            for mine, ref in zip(ours[1:], theirs[1:]):  # embeddings' output left out
                num += float((mine[keep] - ref[keep]).square().sum())
                den += float(ref[keep].square().sum())
    value = _held_out(OBJECTIVES["layers-mse"], tiny_bert, compressed, batches)
    assert value == pytest.approx(math.sqrt(num / den), rel=1e-6)
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


def test_layers_embedding_adds_the_pooled_cosine_distance_to_layers_mse(tiny_bert, monkeypatch):
    from lyoncompress.refine import distill as module

    compressed = _compressed(tiny_bert, 4)
    batches = _batches(3, 1)
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool()
            ours = compressed(**batch, output_hidden_states=True).hidden_states
            theirs = tiny_bert(**batch, output_hidden_states=True).hidden_states
            batch_den = sum(float(ref[keep].square().sum()) for ref in theirs[1:])
            num += sum(float((m[keep] - r[keep]).square().sum()) for m, r in zip(ours[1:], theirs[1:]))
            # brute force: each sentence's mean over its real tokens, then the cosine
            cosines = [
                torch.nn.functional.cosine_similarity(
                    ours[-1][i][keep[i]].mean(0), theirs[-1][i][keep[i]].mean(0), dim=0
                )
                for i in range(len(keep))
            ]
            num += 0.5 * batch_den * float(1 - torch.stack(cosines).mean())
            den += batch_den
    monkeypatch.setattr(module, "EMBEDDING_WEIGHT", 0.5)
    value = _held_out(OBJECTIVES["layers-embedding"], tiny_bert, compressed, batches)
    assert value == pytest.approx(math.sqrt(num / den), rel=1e-6)
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


def test_warmup_ramps_the_step_then_decays_over_the_rest():
    from lyoncompress.refine.distill import _schedule

    factors = [_schedule(10, 4, decay=True)(step) for step in range(10)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == 1.0 and factors[4:] == sorted(factors[4:], reverse=True)
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert [_schedule(10, 0, decay=True)(s) for s in range(3)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(3)]
    )  # no warm-up: the cosine decay as before
    assert [_schedule(10, 2, decay=False)(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_warmup_of_all_the_steps_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="warmup 5"):
        distill(tiny_bert, _compressed(tiny_bert, 4), _batches(2, 2), _batches(1, 3), steps=5, warmup=5)
