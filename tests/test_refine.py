"""Accuracy recovery: activation-aware starts, layer-wise refinement, structure
choice, permutation search and calibration capture (small shapes, float64)."""

import pytest
import torch
from torch import nn

from lyoncompress.butterfly import lowrank, monarch
from lyoncompress.capture import capture_inputs
from lyoncompress.errors import InputError
from lyoncompress.factorization import project
from lyoncompress.refine import (
    Whitening,
    activation_aware_lowrank,
    activation_aware_projection,
    apply_permutation,
    gram,
    least_squares_error,
    output_energy,
    output_error,
    refine_layer,
    search_permutation,
    sqrt_factor,
)
from lyoncompress.structures import AUTO, choose_structure, hybrid_start

F64 = torch.float64


def _inputs(samples: int, n: int, seed: int, draw: int = 0) -> torch.Tensor:
    """Correlated inputs with a decaying spectrum, like real activations; ``seed``
    fixes the distribution, ``draw`` the samples (held-out sets differ in ``draw``)."""
    scales = torch.logspace(0, -2, n, dtype=F64)
    mix = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))[0]
    noise = torch.randn(samples, n, generator=torch.Generator().manual_seed(1000 + draw), dtype=F64)
    return (noise * scales) @ mix.T


def _random_twiddles(chain, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for shape in chain.twiddle_shapes]


def test_activation_aware_lowrank_vs_closed_form():
    w = torch.randn(12, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    g = gram(_inputs(200, 8, 1))
    twiddles = activation_aware_lowrank(w, g, 3, damping=0.0)
    approx = lowrank(12, 8, 3).to_dense(twiddles)
    # Eckart–Young in the whitened space: error² = tail of the spectrum of W L
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(g))
    expected = float((s[3:].square().sum() / s.square().sum()).sqrt())
    assert output_error(w, approx, g) == pytest.approx(expected, rel=1e-9)
    plain = lowrank(12, 8, 3).to_dense(project(w, lowrank(12, 8, 3)).twiddles)
    assert output_error(w, approx, g) < output_error(w, plain, g)


def test_activation_aware_lowrank_beats_perturbations():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 5, dtype=F64, generator=gen)
    g = gram(_inputs(100, 5, 3))
    u, v = activation_aware_lowrank(w, g, 2, damping=0.0)
    best = output_error(w, (u @ v)[0, 0], g)
    for _ in range(200):
        du, dv = (
            1e-2 * torch.randn(u.shape, dtype=F64, generator=gen),
            1e-2 * torch.randn(v.shape, dtype=F64, generator=gen),
        )
        assert output_error(w, ((u + du) @ (v + dv))[0, 0], g) >= best - 1e-12


def test_activation_aware_lowrank_with_identity_gram_is_plain_svd():
    w = torch.randn(10, 7, dtype=F64, generator=torch.Generator().manual_seed(4))
    chain = lowrank(10, 7, 3)
    aware = chain.to_dense(activation_aware_lowrank(w, torch.eye(7, dtype=F64), 3))
    plain = chain.to_dense(project(w, chain).twiddles)
    torch.testing.assert_close(aware, plain, rtol=1e-10, atol=1e-10)


def test_activation_aware_projection_recovers_exact_monarch():
    chain = monarch(16, 8, 2, 2)
    w = chain.to_dense(_random_twiddles(chain, 5))
    twiddles = activation_aware_projection(w, chain, gram(_inputs(64, 8, 6)), damping=0.0)
    torch.testing.assert_close(chain.to_dense(twiddles), w, rtol=1e-9, atol=1e-9)


def test_activation_aware_projection_on_lowrank_chain_is_aware_svd():
    w = torch.randn(9, 6, dtype=F64, generator=torch.Generator().manual_seed(7))
    g = gram(_inputs(50, 6, 8))
    chain = lowrank(9, 6, 2)
    torch.testing.assert_close(
        chain.to_dense(activation_aware_projection(w, chain, g)),
        chain.to_dense(activation_aware_lowrank(w, g, 2)),
    )


def _planted(seed: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Monarch weight plus a little noise, and train / held-out inputs."""
    chain = monarch(32, 16, 4, 2)
    gen = torch.Generator().manual_seed(seed)
    w = chain.to_dense(_random_twiddles(chain, seed)) + 0.05 * torch.randn(32, 16, dtype=F64, generator=gen)
    return w, gram(_inputs(400, 16, seed + 1)), gram(_inputs(200, 16, seed + 1, draw=1))


def test_refine_layer_improves_planted_and_is_never_worse():
    w, g_train, g_val = _planted()
    chain = monarch(32, 16, 4, 1)  # rank 1: cannot fit the rank-2 plant, so there is error left
    start = project(w, chain).twiddles
    result = refine_layer(w, chain, start, g_train, g_val, steps=150)
    assert not result.diverged
    assert result.err_before == pytest.approx(output_error(w, chain.to_dense(start), g_val))
    assert result.err_after <= result.err_before
    assert result.err_after < 0.8 * result.err_before
    assert result.err_after == pytest.approx(output_error(w, chain.to_dense(result.twiddles), g_val))
    assert result.lowrank_twiddles == []


def test_shared_whitening_and_energy_change_no_number():
    w, g_train, g_val = _planted()
    chain = monarch(32, 16, 4, 1)
    start = project(w, chain).twiddles
    own = refine_layer(w, chain, start, g_train, g_val, steps=20, damping=1e-3)
    shared = refine_layer(w, chain, start, g_train, g_val, steps=20, whitening=Whitening.of(g_train, 1e-3))
    assert shared.err_after == own.err_after
    for mine, theirs in zip(shared.twiddles, own.twiddles):
        assert torch.equal(mine, theirs)
    approx = chain.to_dense(start)
    energy = output_energy(w, g_val)
    assert output_error(w, approx, g_val, energy) == pytest.approx(output_error(w, approx, g_val), rel=1e-12)


def test_damped_factor_in_place_equals_the_explicit_ridge_bit_for_bit():
    # the in-place ridge on the diagonal must give the numbers of G + δ·I exactly, on a
    # well-conditioned moment and on a rank-deficient one (fewer samples than features)
    for x in (_inputs(200, 24, seed=3), _inputs(10, 24, seed=4)):
        g = gram(x)
        for damping in (1e-4, 1e-2):
            delta = damping * float(torch.diagonal(g).mean())
            explicit = torch.linalg.cholesky(g + delta * torch.eye(24, dtype=F64))
            assert torch.equal(sqrt_factor(g, damping), explicit)
        assert torch.equal(g, gram(x))  # the caller's moment is not modified
    whitening = Whitening.of(g, 1e-3)
    assert torch.equal(whitening.gram, whitening.chol @ whitening.chol.T)
    assert whitening.gram is whitening.gram  # computed once


def test_activation_aware_lowrank_with_a_given_factor_changes_no_number():
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(5), dtype=F64)
    g = gram(_inputs(300, 24, seed=6))
    own = activation_aware_lowrank(w, g, 5)
    shared = activation_aware_lowrank(w, g, 5, chol=Whitening.of(g).chol)
    for mine, theirs in zip(shared, own):
        assert torch.equal(mine, theirs)


def test_least_squares_error_solves_the_output_side_factor_exactly():
    # an exact Monarch with a wrong first factor: one solve for X_1 given X_2 recovers it
    chain = monarch(24, 12, 3, 2)
    exact = _random_twiddles(chain, 31)
    w = chain.to_dense(exact)
    g_train, g_val = gram(_inputs(200, 12, 32)), gram(_inputs(200, 12, 32, draw=1))
    wrong = [torch.randn_like(exact[0]), exact[1]]
    assert output_error(w, chain.to_dense(wrong), g_val) > 0.5
    assert least_squares_error(w, chain, wrong, g_train, g_val, whitening=Whitening.of(g_train, 0.0)) < 1e-6


def test_refine_layer_with_sampled_columns():
    w, g_train, g_val = _planted()
    chain = monarch(32, 16, 4, 1)
    start = project(w, chain).twiddles
    full = refine_layer(w, chain, start, g_train, g_val, steps=100)
    sampled = refine_layer(w, chain, start, g_train, g_val, steps=100, columns=6)
    assert sampled.err_after <= sampled.err_before
    assert sampled.err_after < 1.2 * full.err_after


def test_refine_layer_keeps_start_when_held_out_disagrees():
    w, g_train, _ = _planted()
    chain = monarch(32, 16, 4, 1)
    start = project(w, chain).twiddles
    # held-out inputs live where the training inputs are nearly absent
    weak = torch.linalg.eigh(g_train).eigenvectors[:, :2]  # (16, 2) weakest directions
    g_val = weak @ weak.T
    result = refine_layer(w, chain, start, g_train, g_val, steps=30)
    assert result.err_after <= result.err_before


def _planted_hybrid(chain, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``chain`` weight plus a random rank-``rank`` term, and train / held-out Grams."""
    (m, n), gen = chain.shape, torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, dtype=F64, generator=gen) @ torch.randn(rank, n, dtype=F64, generator=gen)
    w = chain.to_dense(_random_twiddles(chain, seed)) + low
    return w, gram(_inputs(300, n, seed + 1)), gram(_inputs(100, n, seed + 1, draw=1))


def test_refine_layer_with_lowrank_term():
    chain = monarch(32, 16, 4, 1)
    w, g_train, g_val = _planted_hybrid(chain, 2, 11)
    start = project(w, chain).twiddles
    result = refine_layer(w, chain, start, g_train, g_val, steps=100, lowrank_rank=2)
    assert [tuple(t.shape) for t in result.lowrank_twiddles] == [(1, 1, 32, 2), (1, 1, 2, 16)]
    assert result.err_after <= result.err_before
    assert result.err_after < 0.5 * result.err_before


def test_refine_layer_divergence_falls_back_to_start():
    w, g_train, g_val = _planted()
    chain = monarch(32, 16, 4, 1)
    start = project(w, chain).twiddles
    result = refine_layer(w, chain, start, g_train, g_val, steps=20, lr=1e8)
    assert result.diverged
    assert all(torch.equal(a, b) for a, b in zip(result.twiddles, start))
    assert result.err_after == result.err_before


def _brute_force_last_factors(w, chain, twiddles, low, g):
    """Minimise ``tr((W - A Z) G (W - A Z)^T)`` over ``Z = [X_L; V]`` on its support by
    the explicit normal equations ``(H ⊗ G)[S, S] z_S = vec(A^T W G)[S]``."""
    head = chain.patterns[0].to_dense(twiddles[0])
    a = torch.cat([head, low[0][0, 0]], dim=1)
    mask = torch.cat(
        [chain.patterns[1].support(), torch.ones(low[1].shape[-2], w.shape[1], dtype=torch.bool)]
    )
    support = mask.reshape(-1)
    hessian = torch.kron(a.T @ a, g)[support][:, support]
    rhs = (a.T @ w @ g).reshape(-1)[support]
    z = torch.zeros(mask.shape, dtype=F64)
    z[mask] = torch.linalg.solve(hessian, rhs)
    return a @ z


def test_solve_last_factors_is_exact_least_squares(monkeypatch):
    from lyoncompress.refine import layerwise

    monkeypatch.setattr(layerwise, "_CG_ITERATIONS", 300)  # CG is exact in at most |support| steps
    chain = monarch(24, 12, 2, 2)  # A = [X_1, U] is 24 x (8 + 2): the solution is unique
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(24, 12, dtype=F64, generator=gen)
    twiddles = _random_twiddles(chain, 22)
    low = [
        torch.randn(1, 1, 24, 2, dtype=F64, generator=gen),
        torch.randn(1, 1, 2, 12, dtype=F64, generator=gen),
    ]
    g = gram(_inputs(100, 12, 23))
    problem = layerwise._Problem(w, chain, 2, Whitening.of(g, damping=0.0), g)
    solved = problem.solve_last_factors(twiddles + low)
    expected = _brute_force_last_factors(w, chain, twiddles, low, problem.gram)
    torch.testing.assert_close(problem.dense(solved), expected, rtol=1e-8, atol=1e-8)
    assert torch.equal(solved[0], twiddles[0]) and torch.equal(solved[2], low[0])


def test_alternating_sweeps_fit_a_planted_monarch_plus_lowrank():
    chain = monarch(16, 12, 2, 1)
    w, g_train, g_val = _planted_hybrid(chain, 1, 31)
    start, low_start = hybrid_start(w, g_train, chain.params + 28, 2, lowrank_share=28 / (chain.params + 28))[
        1:
    ]
    without = refine_layer(
        w, chain, start, g_train, g_val, steps=0, sweeps=0, lowrank_rank=1, lowrank_init=low_start
    )
    swept = refine_layer(
        w, chain, start, g_train, g_val, steps=0, sweeps=200, lowrank_rank=1, lowrank_init=low_start
    )
    assert without.err_after > 1e-2
    assert swept.err_after < 0.05 * without.err_after  # 0.073 -> 0.0008 when written


def test_refine_layer_rejects_bad_inputs():
    w, g_train, g_val = _planted()
    chain = monarch(32, 16, 4, 1)
    with pytest.raises(InputError, match="gram_train"):
        refine_layer(w, chain, project(w, chain).twiddles, g_train[:8, :8], g_val)


def test_hybrid_start_fits_budget():
    w, g_train, _ = _planted()
    budget = 256
    chain, twiddles, low = hybrid_start(w, g_train, budget, blocks=2, lowrank_share=0.5)
    assert chain.params + sum(t.numel() for t in low) <= budget
    assert low and low[0].shape[-1] >= 1


def test_choose_structure_picks_lowest_held_out_error():
    w, g_train, g_val = _planted()
    choice = choose_structure(w, g_train, g_val, budget=0.5, steps=40, blocks=(2, 4))
    names = {c.name for c in choice.candidates}
    assert names == set(AUTO.calibrated)
    assert choice.chosen.val_error == min(c.val_error for c in choice.candidates)
    assert all(c.params <= 0.5 * 32 * 16 for c in choice.candidates)
    # the plant is a Monarch: a structured candidate wins over plain low rank
    # (issue 16: the geometry-searched hybrid, structure "hybrid", may now win)
    assert choice.chosen.name in ("monarch", "hybrid", "hybrid-search")


def test_choose_structure_unknown_candidate_lists_registered():
    w, g_train, g_val = _planted()
    with pytest.raises(InputError, match="registered: lowrank"):
        choose_structure(w, g_train, g_val, budget=0.5, candidates=("svd",))


def _mlp(hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monarch W1 (hidden, 16) and W2 (16, hidden), rank 1, then hidden units shuffled."""
    c1, c2 = monarch(hidden, 16, 4, 1), monarch(16, hidden, 4, 1)
    w1, w2 = c1.to_dense(_random_twiddles(c1, seed)), c2.to_dense(_random_twiddles(c2, seed + 1))
    shuffle = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed + 2))
    b1 = torch.randn(hidden, dtype=F64, generator=torch.Generator().manual_seed(seed + 3))
    return apply_permutation(w1, b1, w2, shuffle)


def test_apply_permutation_is_function_preserving():
    w1, b1, w2 = _mlp(32, 20)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    p1, pb1, p2 = apply_permutation(w1, b1, w2, perm)
    x = torch.randn(5, 16, dtype=F64)

    def hidden_of(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # per-unit reductions, so each unit's value does not depend on its position
        return torch.nn.functional.gelu((x[:, None, :] * w[None]).sum(-1) + b)  # (5, hidden)

    assert torch.equal(hidden_of(p1, pb1), hidden_of(w1, b1)[:, perm])
    torch.testing.assert_close(hidden_of(p1, pb1) @ p2.T, hidden_of(w1, b1) @ w2.T, rtol=1e-13, atol=1e-13)


def test_search_permutation_recovers_planted_monarch():
    w1, b1, w2 = _mlp(32, 30)
    c1, c2 = monarch(32, 16, 4, 1), monarch(16, 32, 4, 1)
    before = project(w1, c1).rel_error + project(w2, c2).rel_error
    perm = search_permutation(w1, w2, c1, c2)
    assert sorted(perm.tolist()) == list(range(32))
    p1, _, p2 = apply_permutation(w1, b1, w2, perm)
    after = project(p1, c1).rel_error + project(p2, c2).rel_error
    assert before > 0.3
    assert after < 1e-6


def test_search_permutation_never_worse_than_identity():
    gen = torch.Generator().manual_seed(40)
    w1, w2 = torch.randn(32, 16, dtype=F64, generator=gen), torch.randn(16, 32, dtype=F64, generator=gen)
    c1, c2 = monarch(32, 16, 4, 2), monarch(16, 32, 4, 2)
    perm = search_permutation(w1, w2, c1, c2, restarts=1)
    p1, _, p2 = apply_permutation(w1, None, w2, perm)
    identity = project(w1, c1).rel_error ** 2 + project(w2, c2).rel_error ** 2
    assert project(p1, c1).rel_error ** 2 + project(p2, c2).rel_error ** 2 <= identity + 1e-12


class _Masked(nn.Module):
    """Takes a tokenizer-style mapping, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3).double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(input_ids)


def test_capture_inputs_matches_manual_grams():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    batches = [torch.randn(4, 6, dtype=F64) for _ in range(8)]
    calib = capture_inputs(model, ["0", "2"], batches, max_samples=10_000, val_every=4)
    train = torch.cat([b for i, b in enumerate(batches) if i % 4 != 3])
    val = torch.cat([b for i, b in enumerate(batches) if i % 4 == 3])
    torch.testing.assert_close(calib["0"].gram_train, train.T @ train)
    torch.testing.assert_close(calib["0"].gram_val, val.T @ val)
    hidden = torch.relu(model[0](train)).detach()
    torch.testing.assert_close(calib["2"].gram_train, hidden.T @ hidden)
    assert (calib["2"].rows_train, calib["2"].rows_val) == (24, 8)


def test_capture_inputs_bounds_rows_and_skips_padding():
    model = _Masked()
    x = torch.randn(2, 5, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    batch = {"input_ids": x, "attention_mask": mask}
    calib = capture_inputs(model, ["proj"], [batch, batch], max_samples=6, val_every=2)
    rows = x[mask.bool()][:6]  # 7 real tokens, capped at 6
    torch.testing.assert_close(calib["proj"].gram_train, rows.T @ rows)
    assert calib["proj"].rows_train == 6


def test_capture_inputs_rejects_non_linear_names():
    with pytest.raises(InputError, match="nn.Linear"):
        capture_inputs(nn.Sequential(nn.ReLU()), ["0"], [torch.randn(2, 3)])


def _old_sqrt_factor(g: torch.Tensor, damping: float) -> torch.Tensor:
    """The factor as computed before it was made in place: a damped copy, then a new L."""
    damped = g.to(F64, copy=True)
    damped.diagonal().add_(damping * float(damped.diagonal().mean().clamp_min(1e-300)))
    return torch.linalg.cholesky(damped)


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 600])
def test_factor_made_in_the_damped_copy_equals_a_new_cholesky_bit_for_bit(n):
    # n around the in-place transpose's 256-wide tiles; a rank-deficient moment (n/2 samples)
    g = gram(_inputs(max(n // 2, 1), n, seed=n))
    for moment in (g, g.float()):  # a float32 moment is damped in a float64 copy as before
        factor = sqrt_factor(moment, 1e-4)
        assert factor.dtype == F64 and factor.is_contiguous() and factor.stride() == (n, 1)
        assert torch.equal(factor, _old_sqrt_factor(moment, 1e-4))
        assert torch.equal(torch.signbit(factor), torch.signbit(_old_sqrt_factor(moment, 1e-4)))
    assert torch.equal(g, gram(_inputs(max(n // 2, 1), n, seed=n)))  # the caller's moment is untouched


@pytest.mark.parametrize("n", [1, 5, 256, 300, 513])
def test_transpose_in_place_moves_every_entry(n):
    from lyoncompress.refine.gram import _transpose_in_place

    square = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    expected = square.T.clone()
    assert _transpose_in_place(square) is square
    assert torch.equal(square, expected)


def test_finiteness_check_by_slabs_agrees_with_isfinite_everywhere():
    from lyoncompress.refine.gram import all_finite, check_gram

    g = gram(_inputs(50, 600, seed=1))
    assert all_finite(g) and all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("nan")))
    check_gram(g, 600)
    for row, value in ((0, float("nan")), (599, float("inf")), (300, -float("inf"))):
        bad = g.clone()
        bad[row, 17] = value
        assert not all_finite(bad) and not bool(torch.isfinite(bad).all())
        with pytest.raises(InputError, match="NaN/Inf"):
            check_gram(bad, 600)


def test_in_place_output_error_products_equal_the_old_expressions_bit_for_bit():
    g = gram(_inputs(400, 48, seed=8))
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(9))  # float32, as layers are
    approx = (w + 0.1 * torch.randn(20, 48, generator=torch.Generator().manual_seed(10))).to(torch.bfloat16)
    w64 = w.to(F64)
    old_energy = float(((w64 @ g) * w64).sum())
    assert output_energy(w, g) == old_energy
    e = w64 - approx.to(F64)
    old_error = float((((e @ g) * e).sum().clamp_min(0.0) / old_energy).sqrt())
    assert output_error(w, approx, g) == old_error
    assert output_error(w, approx, g, old_energy) == old_error
    assert output_error(w64, w64, g) == 0.0  # a float64 weight is copied, not changed in place
    assert torch.equal(w64, w.to(F64))
