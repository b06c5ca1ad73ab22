"""ButterflyLinear against dense nn.Linear; autograd; torch.compile; state-dict names."""

import pytest
import torch
from torch import nn

from lyoncompress.butterfly import monarch, search_chains, square_butterfly
from lyoncompress.errors import PatternError
from lyoncompress.layers import ButterflyLinear


def _exact_linear(chain, bias=True) -> tuple[nn.Linear, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    twiddles = [torch.randn(p.twiddle_shape, generator=gen, dtype=torch.float64) for p in chain.patterns]
    m, n = chain.shape
    linear = nn.Linear(n, m, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(chain.to_dense(twiddles))
    return linear, twiddles


@pytest.mark.parametrize(
    "chain", [square_butterfly(32), monarch(48, 24, 4), search_chains(30, 42, 3)[10]], ids=str
)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_dense_linear(chain, bias):
    linear, _ = _exact_linear(chain, bias)
    layer = ButterflyLinear.from_linear(linear, chain)
    x = torch.randn(5, chain.shape[1], dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_dense(), linear.weight, rtol=1e-10, atol=1e-10)
    assert layer.params == chain.params


def test_state_dict_names_follow_the_artifact_layout():
    layer = ButterflyLinear(16, 16, square_butterfly(16), lowrank_rank=2)
    assert sorted(layer.state_dict()) == [
        "bias",
        "factors.0.twiddle",
        "factors.1.twiddle",
        "factors.2.twiddle",
        "factors.3.twiddle",
        "lowrank.0.twiddle",
        "lowrank.1.twiddle",
    ]
    assert layer.state_dict()["lowrank.0.twiddle"].shape == (1, 1, 16, 2)


def test_lowrank_term_adds_to_the_chain():
    chain = monarch(12, 8, 2)
    twiddles = [torch.randn(s, dtype=torch.float64) for s in chain.twiddle_shapes]
    u, v = torch.randn(1, 1, 12, 3, dtype=torch.float64), torch.randn(1, 1, 3, 8, dtype=torch.float64)
    layer = ButterflyLinear.from_twiddles(chain, twiddles, None, [u, v])
    expected = chain.to_dense(twiddles) + u[0, 0] @ v[0, 0]
    torch.testing.assert_close(layer.to_dense(), expected)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T)


def test_gradcheck_float64():
    chain = search_chains(6, 8, 2, max_rank=2)[-1]
    layer = ButterflyLinear(8, 6, chain, dtype=torch.float64, lowrank_rank=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    names, params = zip(*layer.named_parameters())

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


def test_torch_compile_matches_eager():
    chain = monarch(16, 16, 4)
    linear, _ = _exact_linear(chain)
    layer = ButterflyLinear.from_linear(linear, chain)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), layer(x))


def test_shape_mismatch_is_refused():
    with pytest.raises(PatternError, match="maps 8 -> 16"):
        ButterflyLinear(8, 16, square_butterfly(16))
