"""CPU routes of KS chain products vs the dense product of the factors (float64)."""

import pytest
import torch

from lyoncompress import cpu_routes
from lyoncompress.butterfly import Chain, lowrank, monarch, search_chains, square_butterfly
from lyoncompress.errors import PatternError
from lyoncompress.layers import ButterflyLinear

CHAINS = [
    lowrank(24, 10, 3),
    lowrank(7, 13, 5),
    monarch(12, 8, 4, rank=2),
    monarch(15, 9, 3),
    square_butterfly(16),
    search_chains(12, 18, 3, max_rank=2)[5],
    Chain.of((1, 5, 7, 1)),
    Chain.of((2, 3, 4, 3)),
]


def _twiddles(chain: Chain, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in chain.twiddle_shapes]


@pytest.mark.parametrize("route", sorted(cpu_routes.ROUTES))
@pytest.mark.parametrize("chain", CHAINS, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_vs_dense_product(chain, route, with_bias, rng):
    twiddles = _twiddles(chain, rng)
    m, n = chain.shape
    bias = torch.randn(m, dtype=torch.float64, generator=rng) if with_bias else None
    x = torch.randn(2, 5, n, dtype=torch.float64, generator=rng)
    expected = x @ chain.to_dense(twiddles).T + (0 if bias is None else bias)
    y = cpu_routes.chain_apply(chain.patterns, twiddles, x, bias, route=route)
    assert y.shape == (2, 5, m) and y.is_contiguous()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("route", sorted(cpu_routes.ROUTES))
def test_route_gradients_vs_einsum(route, rng):
    chain = monarch(12, 8, 4, rank=2)
    x = torch.randn(6, 8, dtype=torch.float64, generator=rng)
    grads = []
    for name in ("einsum", route):
        twiddles = [t.requires_grad_() for t in _twiddles(chain, torch.Generator().manual_seed(1))]
        cpu_routes.chain_apply(chain.patterns, twiddles, x, route=name).square().sum().backward()
        grads.append([t.grad for t in twiddles])
    for reference, got in zip(*grads):
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)


def test_measured_route_is_cached_per_shape(rng):
    chain = monarch(16, 12, 4)
    twiddles = _twiddles(chain, rng)
    x = torch.randn(9, 12, dtype=torch.float64, generator=rng)
    key = cpu_routes.route_key(chain.patterns, x)
    cpu_routes._routes.pop(key, None)
    chosen = cpu_routes.chain_route(chain.patterns, twiddles, x)
    assert chosen in cpu_routes.ROUTES and cpu_routes._routes[key] == chosen
    assert key[2] == 16  # rows rounded up to a power of two
    torch.testing.assert_close(
        cpu_routes.chain_apply(chain.patterns, twiddles, x),
        x @ chain.to_dense(twiddles).T,
        rtol=0,
        atol=1e-12,
    )


def test_plain_gemm_chains_take_the_rows_route_untimed(rng):
    chain = lowrank(24, 10, 3)
    x = torch.randn(5, 10, dtype=torch.float64, generator=rng)
    key = cpu_routes.route_key(chain.patterns, x)
    cpu_routes._routes.pop(key, None)
    assert cpu_routes.chain_route(chain.patterns, _twiddles(chain, rng), x) == "rows"
    assert key not in cpu_routes._routes  # nothing timed, nothing cached


@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (4, 3)], ids=str)
def test_plain_lowrank_layer_forward_vs_dense(lead, with_bias, inference, rng):
    # with autograd the general route runs; without it the two GEMMs on cached 2-D views
    chain = lowrank(13, 7, 4)
    twiddles = _twiddles(chain, rng)
    bias = torch.randn(13, dtype=torch.float64, generator=rng) if with_bias else None
    layer = ButterflyLinear.from_twiddles(chain, twiddles, bias)
    x = torch.randn(*lead, 7, dtype=torch.float64, generator=rng)
    expected = x @ chain.to_dense(twiddles).T + (0 if bias is None else bias)
    with torch.inference_mode(inference):
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)  # cached views
        with pytest.raises(PatternError, match="takes inputs with 7 features, got 6"):
            layer(torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("chain", [monarch(12, 8, 4), lowrank(12, 8, 2), square_butterfly(8, 2)], ids=str)
def test_hybrid_layer_forward_vs_dense(chain, rng):
    m, n = chain.shape
    lowrank_twiddles = [
        torch.randn(1, 1, m, 3, dtype=torch.float64),
        torch.randn(1, 1, 3, n, dtype=torch.float64),
    ]
    bias = torch.randn(m, dtype=torch.float64, generator=rng)
    layer = ButterflyLinear.from_twiddles(chain, _twiddles(chain, rng), bias, lowrank_twiddles)
    x = torch.randn(4, 3, n, dtype=torch.float64, generator=rng)
    expected = x @ layer.to_dense().T + bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_wrong_feature_count_is_refused():
    layer = ButterflyLinear(8, 8, monarch(8, 8, 2))
    with pytest.raises(PatternError, match="8 features, got 5"):
        layer(torch.zeros(3, 5))


def test_plain_lowrank_inference_views_follow_new_parameters(rng):
    chain = lowrank(9, 6, 3)
    layer = ButterflyLinear.from_twiddles(chain, _twiddles(chain, rng))
    x = torch.randn(2, 6, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        layer(x)  # caches the views of the first twiddles
        replaced = _twiddles(chain, rng)
        state = {f"factors.{i}.twiddle": t for i, t in enumerate(replaced)}
        layer.load_state_dict(state, assign=True)
        torch.testing.assert_close(layer(x), x @ chain.to_dense(replaced).T, rtol=0, atol=1e-12)
        swapped = _twiddles(chain, rng)
        for factor, twiddle in zip(layer.factors, swapped):
            factor.twiddle.data = twiddle
        torch.testing.assert_close(layer(x), x @ chain.to_dense(swapped).T, rtol=0, atol=1e-12)
        layer.float()
        torch.testing.assert_close(
            layer(x.float()), (x @ chain.to_dense(swapped).T).float(), rtol=1e-6, atol=1e-6
        )
        for factor in layer.factors:
            factor.twiddle.mul_(2)  # in place: the views see it
        expected = x.float() @ chain.to_dense([2 * t.float() for t in swapped]).T
        torch.testing.assert_close(layer(x.float()), expected, rtol=1e-6, atol=1e-6)
    y = layer(x.float().requires_grad_())  # training: the general path, with gradients
    y.sum().backward()
    assert all(factor.twiddle.grad is not None for factor in layer.factors)
