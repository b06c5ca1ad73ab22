"""Exact coordinate descent over the diagonal freedom, for float grids on one-path chains.

When every entry of ``W = X_1 … X_L`` is a single product of twiddle entries (a
chainable chain whose ranks are all 1: square butterflies of any radix, rank-1
Monarch), the product error splits over the index ``j`` shared by ``X_ℓ`` and
``X_{ℓ+1}``. Fix every quantized factor except column ``j`` of ``X̂_ℓ`` and row ``j``
of ``X̂_{ℓ+1}``. Entry ``i`` of that column reaches the product only through column
``i`` of the quantized prefix ``P̂ = X̂_1 … X̂_{ℓ-1}`` (``P`` unquantized), entry ``k``
of the row only through row ``k`` of the suffix ``Ŝ = X̂_{ℓ+2} … X̂_L``, so

    ‖W - Ŵ‖² = const + Σ_j Σ_{i,k} w_i v_k (α_i x_i · y_k β_k - x̂_i ŷ_k)²,
    w_i = ‖P̂ e_i‖²,  α_i = ⟨P e_i, P̂ e_i⟩ / w_i,  v_k = ‖e_kᵀ Ŝ‖²,  β_k = ⟨e_kᵀ S, e_kᵀ Ŝ⟩ / v_k,

with ``x, y`` column ``j`` of ``X_ℓ`` and row ``j`` of ``X_{ℓ+1}``: one weighted rank-one
problem per ``j``, which ``solve_rank_one`` solves exactly over every pair of grid
vectors. Re-solving one level at a time therefore never raises the product error.
The statistics follow from the factors alone (no dense product): the columns of
``P`` over one column's support have disjoint supports, so
``w_next = Σ_i X̂_ij² w_i`` and ``(wα)_next = Σ_i X̂_ij X_ij (wα)_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lyoncompress.butterfly import Chain, KSPattern
from lyoncompress.quantization.diagonal import cols, entry_weights, rows
from lyoncompress.quantization.formats import round_significand
from lyoncompress.quantization.rankone import solve_rank_one

Stats = tuple[torch.Tensor, torch.Tensor]  # (w, w·α): squared norms and cross products, one per index


def one_path_per_entry(chain: Chain) -> bool:
    """Whether every entry of the product is a single product of twiddle entries."""
    return chain.is_chainable and all(r == 1 for r in chain.ranks)


def descend(
    chain: Chain, exact: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor], t: int, passes: int
) -> list[torch.Tensor]:
    """``passes`` sweeps of exact per-level re-solves, alternately from the right and the left.

    Args:
        chain: a chain with ``one_path_per_entry`` (the decomposition above needs it).
        exact: float64 twiddles ``(a, d, b, c)`` whose product is the target.
        quantized: a starting point on the ``t``-bit grid (e.g. rounded ``left-to-right``).
        t: significant bits of the grid.
        passes: number of sweeps.

    Returns:
        Quantized twiddles on the grid whose product error is at most the start's.
    """
    q = list(quantized)
    for sweep in range(passes):
        _sweep(chain.patterns, exact, q, t, descending=sweep % 2 == 0)
    return q


def _sweep(
    pats: Sequence[KSPattern], exact: Sequence[torch.Tensor], q: list[torch.Tensor], t: int, descending: bool
) -> None:
    depth = len(pats)
    pre: list[Stats] = [_ones(pats[0].shape[0])]  # pre[ℓ]: columns of X̂_1 … X̂_{ℓ-1}, rows of X̂_ℓ
    for k in range(depth - 1):
        pre.append(_push_cols(pats[k], q[k], exact[k], pre[k]))
    suf: list[Stats] = [_ones(pats[-1].shape[1])]  # suf[ℓ]: rows of X̂_{ℓ+1} … X̂_L, columns of X̂_ℓ
    for k in range(depth - 1, 0, -1):
        suf.insert(0, _push_rows(pats[k], q[k], exact[k], suf[0]))
    for left in range(depth - 2, -1, -1) if descending else range(depth - 1):
        # the factors on the side already swept have changed: refresh that side's statistics
        if descending and left + 2 < depth:
            suf[left + 1] = _push_rows(pats[left + 2], q[left + 2], exact[left + 2], suf[left + 2])
        if not descending and left > 0:
            pre[left] = _push_cols(pats[left - 1], q[left - 1], exact[left - 1], pre[left - 1])
        q[left], q[left + 1] = _solve_level(pats, exact, t, left, pre[left], suf[left + 1])


def _solve_level(
    pats: Sequence[KSPattern], exact: Sequence[torch.Tensor], t: int, left: int, pre: Stats, suf: Stats
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``X̂_left`` and ``X̂_{left+1}``: the exact weighted rank-one optimum for every shared index."""
    first, second = pats[left], pats[left + 1]
    (w, cross_w), (v, cross_v) = pre, suf
    alpha = torch.where(w > 0, cross_w / w.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    beta = torch.where(v > 0, cross_v / v.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))
    x = cols(first, exact[left]) * entry_weights(first, alpha)  # (J, b): α ∘ column j
    y = rows(second, exact[left + 1]) * _row_entry_weights(second, beta)  # (J, c'): row j ∘ β
    sol = solve_rank_one(x, y, t, x_weight=entry_weights(first, w), y_weight=_row_entry_weights(second, v))
    x_hat = round_significand(sol.lam[:, None] * x, t)
    y_hat = round_significand(sol.mu[:, None] * y, t)
    a, b, c, d = first.as_tuple()
    a2, b2, c2, d2 = second.as_tuple()
    return (
        x_hat.reshape(a, c, d, b).permute(0, 2, 3, 1),  # (a, c, d, b) -> (a, d, b, c)
        y_hat.reshape(a2, b2, d2, c2).permute(0, 2, 1, 3),  # (a, b, d, c) -> (a, d, b, c)
    )


def _ones(n: int) -> Stats:
    one = torch.ones(n, dtype=torch.float64)
    return one, one


def _push_cols(pattern: KSPattern, q: torch.Tensor, x: torch.Tensor, stats: Stats) -> Stats:
    """Statistics of the columns of ``P̂ X̂`` (vs ``P X``) from those of the columns of ``P̂``."""
    a, b, c, d = pattern.as_tuple()
    w, cross = (s.reshape(a, b, d).permute(0, 2, 1) for s in stats)  # (a, d, b)
    w = torch.einsum("adbc,adb->acd", q * q, w).reshape(-1)  # (a·c·d,)
    cross = torch.einsum("adbc,adb->acd", q * x, cross).reshape(-1)
    return _normalised(w, cross)


def _push_rows(pattern: KSPattern, q: torch.Tensor, x: torch.Tensor, stats: Stats) -> Stats:
    """Statistics of the rows of ``X̂ Ŝ`` (vs ``X S``) from those of the rows of ``Ŝ``."""
    a, b, c, d = pattern.as_tuple()
    v, cross = (s.reshape(a, c, d).permute(0, 2, 1) for s in stats)  # (a, d, c)
    v = torch.einsum("adbc,adc->abd", q * q, v).reshape(-1)  # (a·b·d,)
    cross = torch.einsum("adbc,adc->abd", q * x, cross).reshape(-1)
    return _normalised(v, cross)


def _normalised(w: torch.Tensor, cross: torch.Tensor) -> Stats:
    # a common factor scales every cost of a level alike and leaves α unchanged; dividing it
    # out keeps deep chains away from overflow
    scale = w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    return w / scale, cross / scale


def _row_entry_weights(pattern: KSPattern, col_weight: torch.Tensor) -> torch.Tensor:
    """Weight of every entry of every row, ``(a·b·d, c)``, from one weight per column ``(a·c·d,)``."""
    a, b, c, d = pattern.as_tuple()
    per_col = col_weight.reshape(a, c, d).permute(0, 2, 1).unsqueeze(2)  # (a, d, 1, c)
    return rows(pattern, per_col.expand(a, d, b, c))
