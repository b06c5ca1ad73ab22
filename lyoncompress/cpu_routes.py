"""Fast CPU products of KS chains: plain GEMMs and batched matmuls, route measured per shape.

The reference product (``Chain.apply``: one einsum per factor) is exact but slow on CPU:
einsum hands back a feature-major view, so the bias add and the next layer's
elementwise ops run on strided memory, and each factor pays an einsum dispatch. Profiled
on MiniLM (batch 8 x 128, 1 thread), the einsum ``bmm`` took 117 ms for half the flops
that ``addmm`` did in 166 ms dense, and ``add``/``gelu`` rose from 33 to 80 ms.

Routes (all differentiable torch ops, so training goes through them too):

* ``einsum``: the reference, factor by factor.
* ``rows``: activations stay batch-major ``(B, features)``; a dense factor ``(1, b, c, 1)``
  is one ``F.linear`` (a low-rank chain is two GEMMs, the bias fused into the last),
  other factors are one batched ``matmul`` over ``(a, d)``.
* ``columns``: activations are feature-major ``(features, B)`` from the first factor to
  the last; a block-diagonal factor (``d = 1``) is then one ``bmm`` on a view, with no
  copy between factors (Monarch's ``(k, kr, n/k, 1)`` factor), and the output is made
  batch-major once at the end.

``chain_apply`` times the routes the first time a (chain, dtype, rows rounded up to a
power of two, thread count) is seen and caches the fastest for the process, as
``kernels.chain_route`` does on the GPU. Patterns are duck-typed (``as_tuple`` and
``apply``), so this module imports only torch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch.nn import functional as F


class PatternLike(Protocol):
    def as_tuple(self) -> tuple[int, int, int, int]: ...

    def apply(self, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


def _rows_factor(pattern: PatternLike, twiddle: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h (B, a*c*d) -> (B, a*b*d)`` batch-major."""
    a, b, c, d = pattern.as_tuple()
    if a == 1 and d == 1:
        return F.linear(h, twiddle[0, 0])  # (B, c) @ (c, b)
    rows = h.shape[0]
    if d == 1:  # block-diagonal: one bmm over the a blocks
        y = torch.bmm(h.view(rows, a, c).transpose(0, 1), twiddle[:, 0].transpose(1, 2))  # (a, B, b)
        return y.transpose(0, 1).reshape(rows, a * b)
    x = h.view(rows, a, c, d).permute(1, 3, 0, 2)  # (a, d, B, c)
    y = torch.matmul(x, twiddle.transpose(-1, -2))  # (a, d, B, b)
    return y.permute(2, 0, 3, 1).reshape(rows, a * b * d)  # (B, a, b, d)


def _columns_factor(pattern: PatternLike, twiddle: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h (a*c*d, B) -> (a*b*d, B)`` feature-major."""
    a, b, c, d = pattern.as_tuple()
    rows = h.shape[-1]
    if d == 1:
        if a == 1:
            return twiddle[0, 0] @ h  # (b, c) @ (c, B)
        return torch.bmm(twiddle[:, 0], h.reshape(a, c, rows)).view(a * b, rows)  # (a, b, B)
    x = h.reshape(a, c, d, rows).transpose(1, 2)  # (a, d, c, B)
    y = torch.matmul(twiddle, x)  # (a, d, b, B)
    return y.transpose(1, 2).reshape(a * b * d, rows)  # (a, b, d, B)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return y
    return y + bias if torch.is_grad_enabled() else y.add_(bias)


def _run_einsum(patterns, twiddles, x, bias):
    for pattern, twiddle in zip(reversed(patterns), reversed(twiddles)):
        x = pattern.apply(twiddle, x)
    # einsum hands back a feature-major view: batch-major memory for the ops downstream
    return _add_bias(x.contiguous(), bias)


def _run_rows(patterns, twiddles, x, bias):
    last = len(patterns) - 1
    for i in range(last, -1, -1):
        a, _, _, d = patterns[i].as_tuple()
        if i == 0 and bias is not None and a == 1 and d == 1:
            return F.linear(x, twiddles[0][0, 0], bias)  # bias fused into the GEMM
        x = _rows_factor(patterns[i], twiddles[i], x)
    return _add_bias(x, bias)


def _run_columns(patterns, twiddles, x, bias):
    h = x.T  # (n, B), a view
    for pattern, twiddle in zip(reversed(patterns[1:]), reversed(twiddles[1:])):
        h = _columns_factor(pattern, twiddle, h)
    a, b, c, d = patterns[0].as_tuple()
    if a == 1 and d > 1:  # last factor strided (Monarch's left one): one copy to (B, m)
        rows = h.shape[-1]
        x = h.reshape(c, d, rows).permute(1, 2, 0)  # (d, B, c), a view BLAS reads as is
        y = torch.bmm(x, twiddles[0][0].transpose(1, 2))  # (d, B, b)
        y = y.permute(1, 2, 0).reshape(rows, b * d)  # (B, b, d): reads d contiguous rows per output row
    else:
        # (B, m): elementwise ops downstream want batch-major memory
        y = _columns_factor(patterns[0], twiddles[0], h).T.contiguous()
    return _add_bias(y, bias)


Runner = Callable[
    [Sequence[PatternLike], Sequence[torch.Tensor], torch.Tensor, torch.Tensor | None], torch.Tensor
]
ROUTES: dict[str, Runner] = {"einsum": _run_einsum, "rows": _run_rows, "columns": _run_columns}
_routes: dict[tuple[object, ...], str] = {}
_TUNE_REPEATS = 3


def _elapsed_s(run: Callable[[], object]) -> float:
    """Best of a few runs after a warm-up: the minimum is what other processes disturb least."""
    run()  # warm the allocator and the BLAS
    best = float("inf")
    for _ in range(_TUNE_REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def route_key(patterns: Sequence[PatternLike], h: torch.Tensor) -> tuple[object, ...]:
    return (
        tuple(p.as_tuple() for p in patterns),
        h.dtype,
        _pow2_ceil(h.shape[0]),
        torch.get_num_threads(),
    )


def chain_route(patterns: Sequence[PatternLike], twiddles: Sequence[torch.Tensor], h: torch.Tensor) -> str:
    """The name of the fastest route (a key of ``ROUTES``) for this chain on ``h (B, n)``.

    Timed on first use of a (chain, dtype, rows rounded up to a power of two, thread
    count), then cached for the process: later calls cost a dictionary lookup.
    """
    if all(_dense_factor(p) for p in patterns):
        # plain GEMMs (low rank): batch-major F.linear is BLAS's own layout; measured 1.0-1.6x
        # faster than the other routes at every size tried (1 to 4096 rows), so no timing
        return "rows"
    key = route_key(patterns, h)
    if key not in _routes:
        with torch.no_grad():
            detached = [t.detach() for t in twiddles]
            timed = {
                name: _elapsed_s(functools.partial(run, patterns, detached, h.detach(), None))
                for name, run in ROUTES.items()
            }
        _routes[key] = min(timed, key=timed.__getitem__)
    return _routes[key]


def _dense_factor(pattern: PatternLike) -> bool:
    a, _, _, d = pattern.as_tuple()
    return a == 1 and d == 1


def chain_apply(
    patterns: Sequence[PatternLike],
    twiddles: Sequence[torch.Tensor],
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    route: str | None = None,
) -> torch.Tensor:
    """``x @ (X_1 … X_L).T (+ bias)``: ``(…, n) -> (…, m)``, ``X_L`` applied first.

    Args:
        patterns, twiddles: the chain's factors in product order.
        x: input of any leading shape.
        bias: added to the output (fused into the last GEMM where the route allows).
        route: a key of ``ROUTES``; None picks the measured fastest (``chain_route``),
            or ``rows`` under ``torch.compile``.

    Example:
        >>> y = chain_apply(chain.patterns, layer.twiddles, x, layer.bias)
    """
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])  # (B, n)
    if route is None:
        # a traced graph cannot time itself: torch.compile gets the batch-major GEMMs
        route = "rows" if torch.compiler.is_compiling() else chain_route(patterns, twiddles, h)
    name = route
    y = ROUTES[name](patterns, twiddles, h, bias)
    return y.reshape(*lead, y.shape[-1])  # (…, m)


def lowrank_accumulate(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y + x @ (U V).T`` with ``U (m, r)``, ``V (r, n)``: two GEMMs, the add fused into the second."""
    lead = x.shape[:-1]
    h = F.linear(x.reshape(-1, x.shape[-1]), v)  # (B, r)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h, u.T)  # (B, m)
    return out.reshape(*lead, out.shape[-1])
