"""Monarch + low rank by variable projection against planted truths and brute force."""

import pytest
import torch

from lyoncompress.butterfly import lowrank
from lyoncompress.refine.gram import Whitening, gram, output_error
from lyoncompress.refine.varpro import (
    SCREEN_ITERATIONS,
    Geometry,
    _VarPro,
    hybrid_geometries,
    hybrid_start,
    search_geometry,
    varpro_fit,
)
from lyoncompress.structures import AUTO, CANDIDATES, calibrated_candidates, choose_structure

F64 = torch.float64


def _planted(m, n, geometry, seed=0):
    """A weight that IS ``X_1 X_2 + U V`` of ``geometry``, and correlated inputs."""
    generator = torch.Generator().manual_seed(seed)
    chain = geometry.chain(m, n)
    twiddles = [torch.randn(s, dtype=F64, generator=generator) for s in chain.twiddle_shapes]
    w = chain.to_dense(twiddles)
    if geometry.lowrank:
        u = torch.randn(m, geometry.lowrank, dtype=F64, generator=generator)
        w = w + u @ torch.randn(geometry.lowrank, n, dtype=F64, generator=generator)
    mix = torch.randn(n, n, dtype=F64, generator=generator)
    x = torch.randn(400, n, dtype=F64, generator=generator) @ mix  # (samples, n), correlated
    return w, gram(x[:300]), gram(x[300:])


def _dense(fit):
    dense = fit.chain.to_dense(fit.twiddles)
    if fit.lowrank_twiddles:
        dense = dense + lowrank(*fit.chain.shape, fit.lowrank_twiddles[0].shape[-1]).to_dense(
            fit.lowrank_twiddles
        )
    return dense


def _dense_solve(problem: _VarPro, outer: list[torch.Tensor]) -> torch.Tensor:
    """The exact ``A`` (``m × s``) of ``problem.coefficients`` for ``Z = [X_2; V]``, scattered
    into a dense matrix: column ``l·q + k`` of group ``k``'s structured rows, then the low rank."""
    x2 = outer[0].to(problem.dtype)
    coef = problem.coefficients(x2, *problem.whitened([x2, outer[1].to(problem.dtype)]))  # (q, b, c + R)
    structured = torch.arange(problem.c)[None, :] * problem.q + torch.arange(problem.q)[:, None]  # (q, c)
    inner = problem.c * problem.q  # p·q·r rows of X_2, row l·q + k with l = i·r + t
    low = torch.arange(inner, inner + problem.rank).expand(problem.q, problem.rank)  # (q, R)
    rows = torch.cat([structured, low], 1)  # (q, c + R): the rows of Z group k sees
    a = torch.zeros(problem.q, problem.b, inner + problem.rank, dtype=problem.dtype)  # (q, b, s)
    a.scatter_(2, rows[:, None, :].expand(-1, problem.b, -1), coef)
    return a.permute(1, 0, 2).reshape(problem.m, -1)  # (m, s): row j·q + k


def test_inner_solve_vs_brute_force_lstsq():
    m, n, geometry = 24, 16, Geometry(4, 6, 1, 2)
    w, g_train, _ = _planted(m, n, geometry)
    w = w + 0.3 * torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(1))  # not exact
    whitening = Whitening.of(g_train)
    chain, twiddles, low = hybrid_start(w, geometry, g_train)
    problem = _VarPro(w, chain, geometry.lowrank, whitening)
    outer = [twiddles[1], low[1].reshape(geometry.lowrank, n)]
    z = torch.cat([chain.patterns[1].to_dense(outer[0]), outer[1]])  # (s, n) = [X_2; V]
    a = _dense_solve(problem, outer)  # (m, s)
    # brute force: least squares over vec(A) restricted to the support of [X_1, U]
    support = torch.cat([chain.patterns[0].support(), torch.ones(m, geometry.lowrank, dtype=torch.bool)], 1)
    zl, wl = z @ whitening.chol, w @ whitening.chol  # (s, n), (m, n)
    design = torch.kron(torch.eye(m, dtype=F64), zl.T.contiguous())[:, support.reshape(-1)]  # (m n, nnz)
    coef = torch.linalg.lstsq(design, wl.reshape(-1)).solution
    brute = torch.zeros(m * z.shape[0], dtype=F64)
    brute[support.reshape(-1)] = coef
    torch.testing.assert_close(a, brute.reshape(m, -1), rtol=1e-8, atol=1e-10)
    assert not a[~support].any()


def test_planted_monarch_in_metric_is_recovered():
    w, g_train, g_val = _planted(48, 32, Geometry(4, 6, 1, 0))
    chain, twiddles, low = hybrid_start(w, Geometry(4, 6, 1, 0), g_train)
    fit = varpro_fit(w, chain, twiddles, low, g_val, Whitening.of(g_train), iterations=20)
    assert fit.err_after < 1e-10
    assert output_error(w, _dense(fit), g_val) < 1e-10


@pytest.mark.parametrize("geometry", [Geometry(4, 4, 1, 1), Geometry(4, 6, 1, 2)], ids=str)
def test_planted_monarch_plus_lowrank_is_recovered(geometry):
    m = 32 if geometry.outputs == 4 else 48
    w, g_train, g_val = _planted(m, 32, geometry)
    chain, twiddles, low = hybrid_start(w, geometry, g_train)
    fit = varpro_fit(w, chain, twiddles, low, g_val, Whitening.of(g_train), iterations=1000)
    assert fit.err_before > 0.3  # the start is far off
    # L-BFGS converges slowly near an exact fit (see RESULTS.md): ~1e-6 .. 1e-5, not 1e-8
    assert fit.err_after < 1e-4
    assert output_error(w, _dense(fit), g_val) == pytest.approx(fit.err_after, rel=1e-6, abs=1e-12)
    assert fit.chain.params + sum(t.numel() for t in fit.lowrank_twiddles) == geometry.params(m, 32)


def test_never_worse_than_start():
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, dtype=F64, generator=generator)
    x = torch.randn(40, 32, dtype=F64, generator=generator)  # few samples: overfits the train split
    g_train, g_val = gram(x[:20]), gram(torch.randn(200, 32, dtype=F64, generator=generator))
    chain, twiddles, low = hybrid_start(w, Geometry(4, 4, 1, 2), g_train)
    for iterations in (0, 5, 50):
        fit = varpro_fit(w, chain, twiddles, low, g_val, Whitening.of(g_train), iterations=iterations)
        assert fit.err_after <= fit.err_before
        assert output_error(w, _dense(fit), g_val) == pytest.approx(fit.err_after, rel=1e-9)


def test_geometry_search_picks_the_planted_geometry():
    m, n, geometry = 48, 32, Geometry(4, 6, 1, 2)
    w, g_train, g_val = _planted(m, n, geometry)
    budget = geometry.params(m, n)  # 544
    assert geometry in hybrid_geometries(m, n, budget)
    # same budget, other block counts and splits between KS rank and low rank
    others = [Geometry(2, 2, 1, 4), Geometry(4, 4, 1, 2), Geometry(2, 3, 1, 4), Geometry(2, 3, 2, 1)]
    grid = [others[0], others[1], geometry, *others[2:]]
    assert all(g.params(m, n) <= budget for g in grid)
    # every geometry fitted in full: a 15-iteration screen ranks this plant only 3rd (the
    # low-rank-heavy geometries converge faster), see RESULTS.md
    found = search_geometry(w, g_train, g_val, budget, iterations=300, geometries=grid, finalists=len(grid))
    assert found.geometry == geometry
    assert found.best.err_after < 1e-3
    assert len(found.tried) == len(grid)
    assert [t.val_error for t in found.tried] == sorted(t.val_error for t in found.tried)


def test_hybrid_geometries_fit_the_budget_and_include_the_issue_prototypes():
    for m, n, budget in ((1536, 384, 0.5), (384, 384, 0.5), (384, 1536, 0.25)):
        grid = hybrid_geometries(m, n, int(budget * m * n))
        assert grid and all(g.params(m, n) <= budget * m * n for g in grid)
        assert all(g.chain(m, n).params + g.lowrank * (m + n) == g.params(m, n) for g in grid)
    assert Geometry(16, 16, 3, 48) in hybrid_geometries(384, 384, 73728)  # the query prototype


def test_hybrid_search_is_in_auto_and_lists_what_it_tried():
    assert CANDIDATES["hybrid-search"] == ("hybrid", "hybrid-search")
    # auto's calibrated set: low rank, the Monarch projection and the searched hybrid;
    # --method hybrid tries both calibrated hybrid fits
    assert calibrated_candidates("hybrid") == ("hybrid", "hybrid-search")
    assert AUTO.calibrated == ("lowrank", "lowrank-aware", "monarch-projection", "hybrid-search")
    w, g_train, g_val = _planted(48, 32, Geometry(4, 6, 1, 2), seed=2)
    choice = choose_structure(w, g_train, g_val, 0.5, steps=200)
    by = {c.name: c for c in choice.candidates}
    assert choice.chosen.name == "hybrid-search"
    assert by["hybrid-search"].val_error < 0.1 * by["lowrank-aware"].val_error
    assert by["hybrid-search"].params <= 0.5 * 48 * 32


def test_screen_ranks_the_planted_geometry_first_and_the_report_lists_the_grid():
    m, n, plant = 48, 32, Geometry(4, 6, 1, 0)  # a Monarch: 384 parameters
    w, g_train, g_val = _planted(m, n, plant, seed=4)
    grid = [Geometry(2, 3, 1, 2), Geometry(2, 2, 1, 2), plant, Geometry(4, 4, 1, 0)]  # same budget
    assert all(g.params(m, n) <= plant.params(m, n) for g in grid)
    found = search_geometry(w, g_train, g_val, plant.params(m, n), iterations=60, geometries=grid)
    # every geometry screened, then the finalist's full fit: the plant both times, first
    # (its activation-aware start is already exact, the others stop at SCREEN_ITERATIONS)
    assert len(found.tried) == len(grid) + 1
    assert {t.geometry for t in found.tried} == set(grid)
    assert found.tried[0].geometry == found.tried[1].geometry == plant == found.geometry
    assert all(t.iterations == SCREEN_ITERATIONS for t in found.tried[2:])
    assert found.best.err_after < 1e-8 < found.tried[2].val_error
    assert [t.val_error for t in found.tried] == sorted(t.val_error for t in found.tried)


def test_patience_stops_a_stalled_fit_and_keeps_its_best_state():
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(32, 32, dtype=F64, generator=generator)  # no structure: held-out gains stall
    x = torch.randn(60, 32, dtype=F64, generator=generator)
    g_train, g_val = gram(x[:30]), gram(x[30:])
    chain, twiddles, low = hybrid_start(w, Geometry(4, 4, 1, 2), g_train)
    whitening = Whitening.of(g_train)
    full = varpro_fit(w, chain, twiddles, low, g_val, whitening, iterations=400)
    early = varpro_fit(w, chain, twiddles, low, g_val, whitening, iterations=400, patience=10, min_gain=1e-2)
    assert early.iterations < full.iterations
    assert early.err_after <= early.err_before
    assert output_error(w, _dense(early), g_val) == pytest.approx(early.err_after, rel=1e-9)


def test_float32_weight_fits_in_float32_as_well_as_float64():
    geometry = Geometry(4, 6, 1, 2)
    w, g_train, g_val = _planted(48, 32, geometry)
    w = w + 0.05 * w.std() * torch.randn(48, 32, dtype=F64, generator=torch.Generator().manual_seed(6))
    whitening = Whitening.of(g_train)
    fits = {}
    for dtype in (F64, torch.float32):
        chain, twiddles, low = hybrid_start(w.to(dtype), geometry, g_train)
        fits[dtype] = varpro_fit(w.to(dtype), chain, twiddles, low, g_val, whitening, iterations=200)
    assert fits[torch.float32].twiddles[0].dtype == torch.float32
    assert fits[torch.float32].err_after == pytest.approx(fits[F64].err_after, rel=1e-3)
