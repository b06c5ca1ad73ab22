"""Hierarchical projection: exact recovery, noise, the √L guarantee, low rank = SVD."""

import math

import pytest
import torch

from lyoncompress.butterfly import Chain, lowrank, monarch, search_chains, square_butterfly
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization import ORDERS, project


def _exact_product(chain: Chain, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    twiddles = [torch.randn(p.twiddle_shape, generator=gen, dtype=dtype) for p in chain.patterns]
    return chain.to_dense(twiddles)


def _first_with_rank_one(m: int, n: int, depth: int) -> Chain:
    """A non-degenerate chain: every factor has b, c > 1 where possible."""
    chains = [c for c in search_chains(m, n, depth) if all(p.b > 1 and p.c > 1 for p in c.patterns)]
    return chains[len(chains) // 2]


EXACT_CASES = [
    square_butterfly(256),
    square_butterfly(1024, radix=4),
    monarch(256, 256, 16),
    monarch(384, 1536, 8, rank=2),
    _first_with_rank_one(768, 3072, 2),
    _first_with_rank_one(768, 3072, 3),
    _first_with_rank_one(3072, 768, 2),
    _first_with_rank_one(3072, 768, 3),
    _first_with_rank_one(384, 1536, 3),
    _first_with_rank_one(105, 105, 3),  # 3·5·7
    search_chains(60, 84, 3, max_rank=2)[-1],
]


@pytest.mark.parametrize("chain", EXACT_CASES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_exact_ks_product_recovered(chain, order):
    target = _exact_product(chain)
    projection = project(target, chain, order)
    assert projection.rel_error <= 1e-12
    torch.testing.assert_close(
        chain.to_dense(projection.twiddles), target, rtol=0, atol=1e-10 * target.abs().max()
    )


def test_float32_and_ranks_above_block_size():
    chain = monarch(64, 64, 8)
    projection = project(_exact_product(chain, dtype=torch.float32), chain)
    assert projection.twiddles[0].dtype == torch.float32 and projection.rel_error < 1e-5
    # rank 16 exceeds the 8x8 blocks: padded with zeros, still exact
    wide = monarch(64, 64, 8, rank=16)
    assert project(_exact_product(chain), wide).rel_error < 1e-12


def _noisy_butterfly(n: int = 1024, noise: float = 0.01) -> tuple[Chain, torch.Tensor]:
    chain = square_butterfly(n)
    clean = _exact_product(chain, seed=1)
    perturb = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return chain, clean + perturb * (noise * clean.norm() / perturb.norm())


@pytest.mark.parametrize("order", ORDERS)
def test_butterfly_plus_noise_within_105_percent_of_noise(order):
    chain, noisy = _noisy_butterfly()
    projection = project(noisy, chain, order)
    assert projection.rel_error <= 1.05 * 0.01
    # the reported error is the true one, whether summed (monotone orders) or materialised
    true_error = float((noisy - chain.to_dense(projection.twiddles)).norm() / noisy.norm())
    assert projection.rel_error == pytest.approx(true_error, rel=1e-9)


def test_orthonormalisation_matters():
    chain, noisy = _noisy_butterfly()
    # without orthonormal splits left-to-right is 2.5x worse here, balanced (no sweep) 1.025x
    # (4.7x and 1.34x on the benchmark's noisy butterfly)
    for order, factor in (("left-to-right", 2.0), ("balanced", 1.0)):
        swept = project(noisy, chain, order).rel_error
        assert project(noisy, chain, order, orthonormal=False).rel_error > factor * swept


def test_balanced_sweep_keeps_the_product():
    """The sweep before each split moves triangular factors between pieces: the product of
    an exact chain must come through unchanged, in float32 and complex too."""
    chain = Chain.of((1, 4, 4, 8), (2, 4, 4, 4), (4, 4, 2, 2), (4, 4, 4, 1), (8, 2, 2, 1))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.complex128, 1e-12)):
        target = _exact_product(chain, seed=6, dtype=dtype)
        projection = project(target, chain, "balanced")
        assert projection.rel_error <= tol
        assert float((target - chain.to_dense(projection.twiddles)).norm() / target.norm()) <= tol


def test_thread_count_is_restored():
    """Small batched eigh/QR run on one thread (many tiny LAPACK calls collapse with more)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        project(_exact_product(square_butterfly(64)), square_butterfly(64), "balanced")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def _bit_reversal(n: int) -> torch.Tensor:
    bits = int(math.log2(n))
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)])


@pytest.mark.parametrize("order", ORDERS)
def test_dft_1024_with_bit_reversal_is_exact(order):
    n = 1024
    dft = torch.fft.fft(torch.eye(n, dtype=torch.complex128))
    projection = project(dft[:, _bit_reversal(n)], square_butterfly(n), order)
    assert projection.rel_error <= 1e-12


def test_hadamard_1024_is_exact():
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(10):
        hadamard = torch.kron(hadamard, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    assert project(hadamard, square_butterfly(1024)).rel_error <= 1e-12


def _best_by_gradient_descent(target: torch.Tensor, chain: Chain, restarts: int, steps: int) -> float:
    """Smallest error found by Adam from many random starts, run as one batch."""
    gen = torch.Generator().manual_seed(3)
    twiddles = [
        (torch.randn((restarts, *p.twiddle_shape), generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
        for p in chain.patterns
    ]
    optimizer = torch.optim.Adam(twiddles, lr=0.05)
    eye = torch.eye(chain.shape[1], dtype=torch.float64).expand(restarts, -1, -1)
    for _ in range(steps):
        x = eye  # (R, n, n): rows of x @ W.T are the columns of W
        for pattern, tw in zip(reversed(chain.patterns), reversed(twiddles)):
            a, b, c, d = pattern.as_tuple()
            x = torch.einsum("Radbc,RBacd->RBabd", tw, x.reshape(restarts, -1, a, c, d)).reshape(
                restarts, -1, a * b * d
            )
        errors = ((x.transpose(1, 2) - target) ** 2).sum(dim=(1, 2))
        optimizer.zero_grad()
        errors.sum().backward()
        optimizer.step()
    return float(errors.detach().min().sqrt() / target.norm())


@pytest.mark.parametrize(
    "chain", [square_butterfly(8), monarch(6, 6, 3), search_chains(6, 4, 3, max_rank=2)[-3]], ids=str
)
def test_error_within_sqrt_depth_of_best_found(chain):
    target = torch.randn(chain.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = project(target, chain).rel_error
    best = _best_by_gradient_descent(target, chain, restarts=300, steps=400)
    assert ours <= math.sqrt(len(chain)) * best + 1e-9


def test_lowrank_is_truncated_svd():
    target = torch.randn(30, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    projection = project(target, lowrank(30, 20, 4))
    s = torch.linalg.svdvals(target)
    assert projection.rel_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-10)


@pytest.mark.parametrize(
    "weight,chain,error,match",
    [
        (torch.zeros(4, 4, 4), square_butterfly(4), InputError, "2-D"),
        (torch.full((4, 4), float("nan")), square_butterfly(4), InputError, "NaN"),
        (torch.ones(8, 8), square_butterfly(4), InputError, "shape"),
        (torch.ones(8, 8), Chain.of((2, 2, 2, 2), (2, 2, 2, 2)), InputError, "a_1 = d_L = 1"),
        (torch.ones(4, 4), Chain.of((1, 2, 2, 2), (1, 1, 1, 4), (1, 4, 4, 1)), PatternError, "not chainable"),
        (torch.ones(8, 8, dtype=torch.int64), square_butterfly(8), InputError, "dtype"),
    ],
)
def test_bad_inputs(weight, chain, error, match):
    with pytest.raises(error, match=match):
        project(weight, chain)


def test_unknown_order():
    with pytest.raises(InputError, match="left-to-right"):
        project(torch.ones(4, 4), square_butterfly(4), order="sideways")
