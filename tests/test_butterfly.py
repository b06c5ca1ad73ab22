"""KS patterns and chains against dense torch and brute force."""

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyoncompress.butterfly import (
    Chain,
    KSPattern,
    _ordered_factorizations,
    budget_chains,
    chain_from_splits,
    lowrank,
    monarch,
    search_chains,
    square_butterfly,
    transpose_twiddles,
)
from lyoncompress.errors import PatternError
from lyoncompress.factorization.projection import project
from lyoncompress.structures import butterfly_chains

small = st.integers(min_value=1, max_value=4)


def _random_twiddles(chain: Chain, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(p.twiddle_shape, dtype=dtype) for p in chain.patterns]


def _support_brute_force(a: int, b: int, c: int, d: int) -> torch.Tensor:
    """I_a ⊗ 1_{b×c} ⊗ I_d, built with kron as written in the paper."""
    return torch.kron(torch.kron(torch.eye(a), torch.ones(b, c)), torch.eye(d)) != 0


@settings(max_examples=60, deadline=None)
@given(a=small, b=small, c=small, d=small)
def test_support_vs_kronecker_definition(a, b, c, d):
    pattern = KSPattern(a, b, c, d)
    mask = pattern.support()
    assert mask.shape == pattern.shape == (a * b * d, a * c * d)
    assert torch.equal(mask, _support_brute_force(a, b, c, d))
    assert int(mask.sum()) == pattern.nnz == a * b * c * d


@settings(max_examples=60, deadline=None)
@given(a=small, b=small, c=small, d=small, batch=st.integers(1, 5))
def test_apply_vs_dense_matmul(a, b, c, d, batch):
    pattern = KSPattern(a, b, c, d)
    twiddle = torch.randn(pattern.twiddle_shape, dtype=torch.float64)
    dense = pattern.to_dense(twiddle)
    assert torch.equal(dense != 0, pattern.support() & (dense != 0))  # nothing off the support
    x = torch.randn(batch, a * c * d, dtype=torch.float64)
    torch.testing.assert_close(pattern.apply(twiddle, x), x @ dense.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(pattern.from_dense(dense), twiddle)


def test_twiddle_entry_convention():
    """X[(i, j, k), (i, l, k)] = twiddle[i, k, j, l], row-major indices."""
    pattern = KSPattern(2, 3, 2, 2)
    twiddle = torch.arange(math.prod(pattern.twiddle_shape), dtype=torch.float64).reshape(
        pattern.twiddle_shape
    )
    dense = pattern.to_dense(twiddle)
    a, b, c, d = pattern.as_tuple()
    for i in range(a):
        for j in range(b):
            for l in range(c):
                for k in range(d):
                    assert dense[i * b * d + j * d + k, i * c * d + l * d + k] == twiddle[i, k, j, l]


@pytest.mark.parametrize(
    "chain",
    [square_butterfly(16), square_butterfly(64, radix=4), monarch(12, 8, 4), lowrank(6, 5, 2)],
    ids=str,
)
def test_chain_apply_dense_and_transpose(chain):
    twiddles = _random_twiddles(chain)
    dense = chain.to_dense(twiddles)
    expected = (
        torch.linalg.multi_dot([p.to_dense(t) for p, t in zip(chain.patterns, twiddles)])
        if len(chain) > 1
        else chain.patterns[0].to_dense(twiddles[0])
    )
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(7, chain.shape[1], dtype=torch.float64)
    torch.testing.assert_close(chain.apply(twiddles, x), x @ dense.T, rtol=1e-12, atol=1e-12)
    transposed = chain.transpose()
    torch.testing.assert_close(transposed.to_dense(transpose_twiddles(twiddles)), dense.T)


def test_builders():
    assert square_butterfly(8).patterns == tuple(
        KSPattern(*p) for p in [(1, 2, 2, 4), (2, 2, 2, 2), (4, 2, 2, 1)]
    )
    assert square_butterfly(64, radix=4).patterns == tuple(
        KSPattern(*p) for p in [(1, 4, 4, 16), (4, 4, 4, 4), (16, 4, 4, 1)]
    )
    assert monarch(4096, 4096, 64).patterns == (KSPattern(1, 64, 64, 64), KSPattern(64, 64, 64, 1))
    assert monarch(768, 3072, 8, rank=2).shape == (768, 3072)
    assert lowrank(5, 7, 3).params == 3 * (5 + 7)
    for chain in (square_butterfly(1024), monarch(384, 1536, 4, 3), lowrank(5, 7, 3)):
        assert chain.is_chainable


@pytest.mark.parametrize(
    "bad", [lambda: square_butterfly(12), lambda: square_butterfly(32, 4), lambda: monarch(10, 8, 4)]
)
def test_builders_refuse_bad_sizes(bad):
    with pytest.raises(PatternError):
        bad()


def test_chain_errors_name_the_factor():
    with pytest.raises(PatternError, match="factor 0 .* factor 1"):
        Chain.of((1, 2, 2, 2), (1, 3, 3, 1))
    not_chainable = Chain.of((2, 2, 2, 1), (1, 2, 2, 2))
    assert not not_chainable.is_chainable
    with pytest.raises(PatternError, match="factor 1"):
        not_chainable.check_chainable()
    with pytest.raises(PatternError, match="depth 0"):
        Chain(())
    with pytest.raises(PatternError, match="positive"):
        KSPattern(0, 1, 1, 1)


def _brute_force_chains(m: int, n: int, depth: int, max_rank: int) -> set[str]:
    """Every valid chain with dense support (a_1 = d_L = 1), filtered by the definition
    of chainability and by search_chains' documented rank rule r_ℓ <= min(m/d_ℓ, n/a_{ℓ+1})."""
    found = set()
    bound = m * n * max_rank

    def keep(chain: Chain) -> bool:
        if chain.shape != (m, n) or not chain.is_chainable:
            return False
        pats = chain.patterns
        return all(r <= min(max_rank, m // pats[i].d, n // pats[i + 1].a) for i, r in enumerate(chain.ranks))

    def extend(prefix, rows):
        if len(prefix) == depth:
            chain = Chain.of(*prefix)
            if prefix[-1][3] == 1 and keep(chain):
                found.add(str(chain))
            return
        for a in range(1, rows + 1):
            for d in range(1, rows + 1):
                if rows % (a * d) or (not prefix and a != 1):
                    continue
                b = rows // (a * d)
                for c in range(1, bound // (a * d) + 1):
                    if len(prefix) == depth - 1 and a * c * d != n:
                        continue
                    extend(prefix + [(a, b, c, d)], a * c * d)

    extend([], m)
    return found


@pytest.mark.parametrize("m,n,depth", [(4, 6, 2), (6, 4, 3), (8, 8, 2), (3, 5, 2)])
def test_search_chains_vs_brute_force(m, n, depth):
    searched = search_chains(m, n, depth, max_rank=2)
    assert [c.params for c in searched] == sorted(c.params for c in searched)
    assert {str(c) for c in searched} == _brute_force_chains(m, n, depth, max_rank=2)


@pytest.mark.parametrize("m,n", [(384, 1536), (768, 3072), (3072, 768), (105, 105)])
def test_search_chains_real_shapes(m, n):
    chains = search_chains(m, n, 2, max_params=m * n // 2)
    assert chains and all(c.shape == (m, n) and c.is_chainable and c.params <= m * n // 2 for c in chains)


def test_search_chains_errors():
    with pytest.raises(PatternError, match="depth"):
        search_chains(8, 8, 0)
    with pytest.raises(PatternError, match="no chainable chain"):
        search_chains(8, 8, 2, max_params=3)


@settings(max_examples=40, deadline=None)
@given(
    p=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
)
def test_chain_from_splits_is_chainable(p, data):
    q = data.draw(st.lists(st.integers(1, 3), min_size=len(p), max_size=len(p)))
    r = data.draw(st.lists(st.integers(1, 3), min_size=len(p), max_size=len(p)))
    m, n = math.prod(q) * data.draw(st.integers(1, 3)), math.prod(p) * data.draw(st.integers(1, 3))
    chain = chain_from_splits(m, n, p, q, r)
    assert chain.shape == (m, n) and chain.is_chainable and chain.ranks == list(r)


def _budget_chains_brute_force(m, n, depth, max_params):
    """Every split pair with p, q >= 2 and the largest uniform rank that fits, by trying all."""
    found = []
    for q in _ordered_factorizations(m, depth - 1):
        for p in _ordered_factorizations(n, depth - 1):
            if min((*p, *q), default=2) < 2:
                continue
            fits = [
                chain
                for r in range(1, min(m, n) + 1)
                if (chain := chain_from_splits(m, n, p, q, [r] * (depth - 1))).params <= max_params
            ]
            if fits:
                found.append(fits[-1])
    return sorted(found, key=lambda chain: (-chain.params, str(chain)))


@pytest.mark.parametrize(
    "m, n, depth, max_params",
    [(64, 32, 3, 500), (48, 24, 2, 300), (36, 24, 3, 400), (16, 16, 4, 200), (24, 16, 3, 120)]
    + [(16, 16, 1, 300)],
)
def test_budget_chains_vs_brute_force(m, n, depth, max_params):
    assert budget_chains(m, n, depth, max_params) == _budget_chains_brute_force(m, n, depth, max_params)


@pytest.mark.parametrize("depth", range(2, 11))
def test_butterfly_chains_of_1024_are_fast_at_every_depth(depth):
    begin = time.perf_counter()
    chains = butterfly_chains(1024, 1024, 0.5, depth)
    assert time.perf_counter() - begin < 2.0  # ~0.2 s at worst (depth 6); minutes before
    assert chains and all(len(c) == depth and c.params <= 1024 * 1024 // 2 for c in chains)


def test_butterfly_method_at_depth_10_recovers_the_radix_2_butterfly():
    butterfly = square_butterfly(1024)
    budget = butterfly.params / (1024 * 1024)  # 20480 / 2^20, exact in binary
    begin = time.perf_counter()
    chains = butterfly_chains(1024, 1024, budget, 10)
    assert time.perf_counter() - begin < 1.0
    assert chains == [butterfly]
    generator = torch.Generator().manual_seed(0)
    twiddles = [torch.randn(shape, generator=generator) for shape in butterfly.twiddle_shapes]
    assert project(butterfly.to_dense(twiddles), chains[0]).rel_error < 1e-5  # float32 precision
