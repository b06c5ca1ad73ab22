"""The structure registry: weight-space fits vs a dense reference, the rank-from-budget
rule vs brute force, the hybrid's weight-space fit, and each structure's name carried
from the recipe through the report to the artifact, with and without calibration."""

import itertools

import numpy as np
import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.butterfly import lowrank, monarch
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization import project
from lyoncompress.factorization.methods import fit_weight
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.recipe import Recipe
from lyoncompress.structures import (
    AUTO,
    CANDIDATES,
    STRUCTURES,
    calibrated_candidates,
    get_structure,
    hybrid_chains,
    hybrid_weight_fit,
    max_params,
    monarch_within,
    rank_for_budget,
)
from tests.helpers import make_mlp_checkpoint

F64 = torch.float64


def _dense(factors) -> torch.Tensor:
    approx = factors.chain.to_dense(factors.twiddles)
    if factors.lowrank_twiddles:
        rank = factors.lowrank_twiddles[0].shape[-1]
        approx = approx + lowrank(*factors.chain.shape, rank).to_dense(factors.lowrank_twiddles)
    return approx


@pytest.mark.parametrize("name", ["auto", *STRUCTURES])
@pytest.mark.parametrize("shape", [(64, 32), (48, 48)])
def test_weight_space_fit_vs_dense_reference(name, shape):
    w = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    factors = fit_weight(name, w, 0.5, 2, "left-to-right")
    reference = float((w - _dense(factors)).norm() / w.norm())
    assert factors.rel_error == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert factors.params <= max_params(*shape, 0.5)
    assert factors.structure in STRUCTURES
    assert factors.rel_error == min(c.rel_error for c in factors.candidates)


def _brute_rank(m: int, n: int, budget: float) -> int:
    return max(r for r in range(min(m, n) + 1) if r * (m + n) <= budget * m * n)


@pytest.mark.parametrize("m,n", list(itertools.product([1, 2, 3, 5, 8], [1, 4, 7, 12])))
def test_rank_for_budget_vs_brute_force(m, n):
    for budget in (0.01, 0.1, 0.25, 0.29, 0.3, 1 / 3, 0.5, 0.77, 1.0):
        assert rank_for_budget(m, n, budget) == _brute_rank(m, n, budget), budget


@pytest.mark.parametrize("m,n,k", [(8, 8, 2), (12, 8, 4), (16, 24, 2), (16, 16, 8)])
def test_monarch_rank_vs_brute_force(m, n, k):
    for params in range(0, m * n + 1, 7):
        fitting = [r for r in range(1, min(m, n) // k + 1) if monarch(m, n, k, r).params <= params]
        if not fitting:
            with pytest.raises(PatternError, match="no Monarch"):
                monarch_within(m, n, k, params)
        else:
            assert monarch_within(m, n, k, params) == monarch(m, n, k, max(fitting))


def _planted_hybrid() -> tuple[torch.Tensor, object]:
    g = torch.Generator().manual_seed(0)
    chain, low = monarch(64, 64, 8, 1), lowrank(64, 64, 8)
    twiddles = [torch.randn(p.a, p.d, p.b, p.c, dtype=F64, generator=g) for p in chain.patterns]
    low_twiddles = [
        torch.randn(1, 1, 64, 8, dtype=F64, generator=g),
        torch.randn(1, 1, 8, 64, dtype=F64, generator=g),
    ]
    return chain.to_dense(twiddles) + 0.3 * low.to_dense(low_twiddles), chain


def test_hybrid_weight_fit_recovers_a_planted_hybrid():
    w, planted = _planted_hybrid()
    chain = hybrid_chains(64, 64, 0.5, 2)[0]
    assert chain == planted
    fit = hybrid_weight_fit(w, chain, max_params(64, 64, 0.5), "left-to-right")
    start = project(w, chain).rel_error
    assert fit.rel_error < 0.05 * start
    assert fit.lowrank_twiddles[0].shape[-1] == 8  # what the Monarch part leaves: 8·(64+64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(16, 16), (32, 16), (24, 36)])
def test_hybrid_weight_fit_never_worse_than_its_monarch_start(seed, shape):
    w = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    for chain in hybrid_chains(*shape, 0.5, 2):
        fit = hybrid_weight_fit(w, chain, max_params(*shape, 0.5), "left-to-right")
        assert fit.rel_error <= project(w, chain).rel_error + 1e-12
        reference = float((w - _dense(fit)).norm() / w.norm())
        assert fit.rel_error == pytest.approx(reference, rel=1e-9)
        if fit.lowrank_twiddles:
            # the low-rank term is the best of its rank for the residual (Eckart–Young)
            residual = w - chain.to_dense(fit.twiddles)
            rank = fit.lowrank_twiddles[0].shape[-1]
            tail = torch.linalg.svdvals(residual)[rank:].square().sum().sqrt()
            assert fit.rel_error == pytest.approx(float(tail / w.norm()), rel=1e-9)


def test_candidates_cover_every_fit_and_auto_is_registered():
    assert {name for name, _ in CANDIDATES.values()} == set(STRUCTURES)
    assert all(label in CANDIDATES for label in AUTO.calibrated)
    assert all(name in STRUCTURES for name in AUTO.weight)
    for name, structure in STRUCTURES.items():
        first, *more = calibrated_candidates(name)
        assert CANDIDATES[first] == (name, "calibrated" if structure.calibrated_fit else "weight")
        assert more == [label for label, _ in structure.more_fits]


def test_unknown_structure_lists_registered_methods():
    with pytest.raises(InputError, match="registered methods: auto, lowrank, monarch, butterfly, hybrid"):
        get_structure("svd")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    ckpt, _ = make_mlp_checkpoint(folder / "ckpt")
    data = folder / "calib.npy"
    np.save(data, np.random.default_rng(0).random((512, 64), dtype=np.float32))
    return ckpt, data


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calib"])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structure_name_round_trips_recipe_report_artifact(tmp_path, mlp, name, calibrated):
    ckpt, data = mlp
    recipe = Recipe(method=name, calib=str(data) if calibrated else None, refine_steps=5)
    report = factorize(ckpt, tmp_path / "out", recipe)
    assert report["recipe"]["method"] == name
    assert [row["structure"] for row in report["layers"]] == [name] * len(report["layers"])
    art = load_artifact(tmp_path / "out")
    assert {record.structure.value for record in art.layers.values()} == {name}
    assert {row["structure"] for row in art.report["layers"]} == {name}
    if name == "hybrid":
        assert all(record.lowrank_rank > 0 for record in art.layers.values())
    for row in report["layers"]:
        assert row["params_after"] <= 0.5 * row["params_before"]
        assert (row["output_error"] is not None) == calibrated
