"""Optimal quantization of a batch of rank-one matrices ``x yᵀ`` on a ``t``-bit float grid.

Gribonval, Mary, Riccietti ("Optimal quantization of rank-one matrices in
floating-point arithmetic"): with an unbounded exponent an optimal pair is
``x̂ = fl(λ x)``, ``ŷ = fl(μ y)``. For a fixed ``x̂`` the best ``ŷ`` rounds
``μ y`` with ``μ = ⟨x, x̂⟩ / ‖x̂‖²`` entry by entry, and

    ‖x yᵀ - x̂ ŷᵀ‖² = ‖y‖² (‖x‖² - μ ⟨x, x̂⟩)  +  ‖x̂‖² ‖μ y - fl(μ y)‖²
                      (direction of x̂)          (rounding of the partner)

because ``x - μ x̂ ⊥ x̂``. Since ``fl(2λx) = 2 fl(λx)`` only ``λ ∈ [1, 2)`` matters,
and there ``fl(λ x)`` is piecewise constant: entry ``i`` changes value where
``λ |x_i|`` crosses one of the ``2^{t-1}`` rounding midpoints of a binade, so
``[1, 2)`` splits into at most ``m·2^{t-1} + 1`` intervals. Evaluating one point per
interval is an exact search. Everything here is batched: no loop over the batch
or over breakpoints (only over memory-sized chunks of the batch).

The same holds with positive diagonal weights on both sides, i.e. for
``‖diag(w)^½ (x yᵀ - x̂ ŷᵀ) diag(v)^½‖²`` with every inner product and norm above
weighted (``⟨x, x̂⟩_w = Σ w_i x_i x̂_i``): for a fixed ``ŷ`` the best ``x̂`` is still an
entry-wise rounding ``fl(ν x)`` (each entry is its own weighted problem) and vice
versa. In a chain, ``w`` is what the factors before ``x`` make of its entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lyoncompress.quantization.formats import round_significand

_CHUNK_ELEMENTS = 1 << 22  # (batch chunk) × (candidates) × (vector length) per step


@dataclass(frozen=True)
class RankOneSolution:
    """Per batch entry: ``x̂ = fl(lam·x)``, ``ŷ = fl(mu·y)`` and the squared error ``cost``."""

    lam: torch.Tensor  # (B,)
    mu: torch.Tensor  # (B,)
    cost: torch.Tensor  # (B,)


def breakpoints(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where and how ``fl(λ x)`` jumps for ``λ ∈ [1, 2)``: for ``x (B, m)``, three
    ``(B, m·2^{t-1})`` tensors: the breakpoints ``β``, and the changes of ``⟨x, x̂⟩``
    and of ``‖x̂‖²`` when ``λ`` crosses them upwards (``x̂_i`` moves one ulp away from 0).

    Zero entries never jump; their breakpoints are reported as ``inf``.
    """
    count, ulp = 2 ** (t - 1), 2.0 ** (1 - t)
    # midpoints between consecutive t-bit significands of the binade [1, 2)
    mid = 1 + (torch.arange(count, dtype=x.dtype, device=x.device) + 0.5) * ulp  # (K,)
    mant, exp = torch.frexp(x.abs())
    frac = (2 * mant).unsqueeze(-1)  # (B, m, 1): |x_i| = frac·2^(exp-1), frac ∈ [1, 2); 0 for 0
    power = torch.exp2((exp - 1).to(x.dtype)).unsqueeze(-1)  # (B, m, 1)
    # λ·frac crosses mid in the binade of x_i when mid >= frac, else in the next one (2·mid);
    # a zero entry gets 2·mid/0 = inf: it never jumps
    binade = (mid < frac).to(x.dtype) + 1  # (B, m, K): 1 or 2
    beta = binade * mid / frac  # (B, m, K)
    binade = binade * power  # 2^e of the binade crossed
    # |x̂_i| goes from (mid - ulp/2)·2^e to (mid + ulp/2)·2^e
    d_dot = (x.abs().unsqueeze(-1) * ulp) * binade
    d_norm2 = (2 * ulp) * mid * binade * binade
    return beta.flatten(-2), d_dot.flatten(-2), d_norm2.flatten(-2)


def solve_rank_one(
    x: torch.Tensor,
    y: torch.Tensor,
    t: int,
    partner: float = 1.0,
    x_weight: torch.Tensor | None = None,
    y_weight: torch.Tensor | None = None,
) -> RankOneSolution:
    """Best ``(λ, μ)`` for each rank-one ``x_k y_kᵀ``.

    Args:
        x: ``(B, m)`` the side whose scale ``λ`` is scanned.
        y: ``(B, n)`` the partner, compensated by ``μ``.
        t: significant bits of the grid (``float:t``).
        partner: weight of the rounding error of ``fl(μ y)`` in the cost: 1 for the
            true error; smaller when the partner is quantized later with scalings of
            its own (left-to-right sweeps), where mostly the direction of ``x̂``
            counts (weighted by ``‖y‖²``) and the partner term only breaks ties.
        x_weight: ``(B, m)`` positive weights of the entries of ``x`` (None: ones).
        y_weight: ``(B, n)`` positive weights of the entries of ``y`` (None: ones).

    Returns:
        ``RankOneSolution``; with ``partner=1`` its ``cost`` is the exact
        ``‖diag(w)^½ (x yᵀ - fl(λx) fl(μy)ᵀ) diag(v)^½‖²``, never above that of
        plain rounding.
    """
    x, y = x.double(), y.double()
    wx = torch.ones_like(x) if x_weight is None else x_weight.double().expand_as(x)
    wy = torch.ones_like(y) if y_weight is None else y_weight.double().expand_as(y)
    batch, m = x.shape
    width = m * 2 ** (t - 1) + 1
    step = max(1, _CHUNK_ELEMENTS // (width * (max(m, y.shape[1]) if partner > 0 else m)))
    parts = [
        _solve_chunk(x[i : i + step], y[i : i + step], wx[i : i + step], wy[i : i + step], t, partner)
        for i in range(0, batch, step)
    ]
    lam, mu, cost = (torch.cat(p, dim=0) for p in zip(*parts))
    return RankOneSolution(lam=lam, mu=mu, cost=cost)


def _solve_chunk(
    x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor, t: int, partner: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    beta, d_dot, d_norm2 = breakpoints(x, t)  # (B, S) each, S = m·K
    wk = wx.repeat_interleave(2 ** (t - 1), dim=-1)  # (B, S): the weight of the entry that jumps
    d_dot, d_norm2 = d_dot * wk, d_norm2 * wk
    beta, order = beta.clamp_max(2.0).sort(dim=-1)
    one = torch.ones_like(beta[..., :1])
    bounds = torch.cat((one, beta, 2 * one), dim=-1)  # (B, S + 2): intervals [lo, hi) of [1, 2)
    lo, hi = bounds[..., :-1], bounds[..., 1:]
    # x̂ on the first interval (that of λ = 1), then one ulp step per breakpoint crossed:
    # ⟨x, x̂⟩ and ‖x̂‖² follow by cumulative sums, with no (B, S, m) tensor
    x_hat = round_significand((1 + beta[..., :1]) / 2 * x, t)  # (B, m)
    dot = torch.cat(((wx * x_hat * x).sum(-1, keepdim=True), d_dot.gather(-1, order)), dim=-1).cumsum(-1)
    norm2 = torch.cat(((wx * x_hat * x_hat).sum(-1, keepdim=True), d_norm2.gather(-1, order)), -1).cumsum(-1)
    mu = dot / norm2.clamp_min(torch.finfo(x.dtype).tiny)  # (B, S + 1); 0 when x̂ = 0 (then dot = 0)
    y_norm2 = (wy * y * y).sum(-1, keepdim=True)  # (B, 1)
    x_norm2 = (wx * x * x).sum(-1, keepdim=True)  # (B, 1)
    cost = y_norm2 * (x_norm2 - mu * dot).clamp_min(0)  # (B, S + 1)
    if partner > 0:
        target = mu.unsqueeze(-1) * y.unsqueeze(-2)  # (B, S + 1, n)
        miss = ((round_significand(target, t) - target) ** 2 * wy.unsqueeze(-2)).sum(-1)
        cost = cost + partner * norm2 * miss
    # an empty interval (two entries jumping at the same λ) is no reachable x̂
    cost = cost.masked_fill(hi <= lo, torch.inf)
    best = cost.argmin(dim=-1, keepdim=True)  # first minimum: ties keep the smallest λ
    lam = (lo.gather(-1, best) + hi.gather(-1, best))[..., 0] / 2  # a λ inside the best interval
    return lam, mu.gather(-1, best)[..., 0], cost.gather(-1, best)[..., 0]
