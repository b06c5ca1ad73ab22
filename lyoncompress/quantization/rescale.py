"""Diagonal rescalings between butterfly factors before rounding, in a registry.

``X_ℓ X_{ℓ+1} = (X_ℓ D)(D⁻¹ X_{ℓ+1})`` for any invertible diagonal ``D`` acting on
the index shared by the two factors: column ``j`` of ``X_ℓ`` (pattern ``(a,b,c,d)``,
``j = (i, l, k) ∈ a×c×d``) and row ``j`` of ``X_{ℓ+1}`` (``j = (i', j', k') ∈ a'×b'×d'``),
both flattened row-major. Column ``j`` of ``X_ℓ`` times row ``j`` of ``X_{ℓ+1}`` is a
rank-one piece of their product, which is where the rank-one solver applies.

A rescaling maps float64 twiddles to ``Rescaled``: the twiddles to round (with the
scales to use, for scaled formats). Names joined by ``+`` compose:
``equalize+left-to-right`` equalises ranges first, then searches per index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lyoncompress.errors import InputError
from lyoncompress.quantization.descent import descend, one_path_per_entry
from lyoncompress.quantization.diagonal import (
    Job,
    Rescaled,
    cols,
    entry_weights,
    prefix_weights,
    rescale_pair,
    rows,
)
from lyoncompress.quantization.feedback import feedback, probes
from lyoncompress.quantization.learned import learn
from lyoncompress.quantization.rankone import solve_rank_one

GRID_POINTS = 64  # candidate λ per index for formats without an exact scan
# sweeps of `descent`: on radix-2 N=64..1024 (t=4, 8) the first lowered the error of left-to-right
# 17-28%, the second 6-8% more, the third 2-4% (radix-4 N=256: 9%, 3%, 1%)
DESCENT_PASSES = 2


def _search_pair(
    job: Job, twiddles: list[torch.Tensor], left: int, partner: bool, weight: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per-index search between factors ``left`` and ``left+1``, applied in place.

    Float grids without scales use the exact rank-one scan (``partner`` adds the
    rounding of the next factor's rows to the cost). Scaled formats freeze the
    factor's scales, try ``GRID_POINTS`` values of ``λ ∈ (1/2, 1]`` per column (a
    column never grows, so the frozen scales stay valid) and keep the one with the
    smallest direction error. ``weight`` ``(rows of factor left,)`` weighs the entries
    of each column (None: ones). Returns the frozen scale of factor ``left`` (or None).
    """
    pats = job.chain.patterns
    x = cols(pats[left], twiddles[left])  # (J, b)
    y = rows(pats[left + 1], twiddles[left + 1])  # (J, c')
    w = torch.ones_like(x) if weight is None else entry_weights(pats[left], weight)  # (J, b)
    t = job.fmt.significand_bits
    if t is not None:
        if partner and y.shape[1] < x.shape[1]:  # exact either way; scan the shorter side
            sol = solve_rank_one(y, x, t, partner=1.0, y_weight=w)
            rescale_pair(job, twiddles, left, sol.mu, sol.lam)
        else:
            sol = solve_rank_one(x, y, t, partner=1.0 if partner else 0.0, x_weight=w)
            rescale_pair(job, twiddles, left, sol.lam, sol.mu)
        return None
    scale = job.fmt.scales(twiddles[left], job.group_size)
    grid = 2.0 ** (-torch.arange(GRID_POINTS, dtype=x.dtype) / GRID_POINTS)  # (K,) in (1/2, 1]
    tried = job.fmt.fake(grid.reshape(-1, 1, 1, 1, 1) * twiddles[left], job.group_size, scale)  # (K,a,d,b,c)
    x_hat = cols(pats[left], tried)  # (K, J, b)
    dot = (w * x_hat * x).sum(-1)  # (K, J)
    norm2 = (w * x_hat * x_hat).sum(-1)
    mu = torch.where(norm2 > 0, dot / norm2.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(dot))
    err = (w * x * x).sum(-1) - mu * dot  # (K, J): ‖x - μ x̂‖²_w, the ‖y_j‖² weight is common to all K
    best = err.argmin(dim=0, keepdim=True)  # (1, J)
    rescale_pair(job, twiddles, left, grid[best[0]], mu.gather(0, best)[0])
    return scale


def rtn(job: Job, twiddles: Sequence[torch.Tensor]) -> Rescaled:
    """``none``: round every factor as it is."""
    return Rescaled(tuple(twiddles), (None,) * len(twiddles))


def optimal(job: Job, twiddles: Sequence[torch.Tensor]) -> Rescaled:
    """``optimal``: two factors, exact per-index optimum (rank-one blocks) of the product error."""
    if len(twiddles) != 2:
        raise InputError(
            f"rescaling 'optimal' needs a chain of two factors, got {len(twiddles)}; "
            "use 'pairwise' or 'left-to-right'"
        )
    return pairwise(job, twiddles)


def pairwise(job: Job, twiddles: Sequence[torch.Tensor]) -> Rescaled:
    """``pairwise``: factors (1,2), (3,4), … each solved as a two-factor problem."""
    out = list(twiddles)
    scales: list[torch.Tensor | None] = [None] * len(out)
    for left in range(0, len(out) - 1, 2):
        scales[left] = _search_pair(job, out, left, partner=True)
    return Rescaled(tuple(out), tuple(scales))


def left_to_right(job: Job, twiddles: Sequence[torch.Tensor], weigh_prefix: bool = True) -> Rescaled:
    """``left-to-right``: quantize factor 1 with the best per-index scales, push the
    compensation into factor 2, and so on; the last pair also weighs the rounding
    of the last factor, which has no scaling of its own.

    Entry ``i`` of a column of ``X_ℓ`` reaches the product through column ``i`` of the
    quantized prefix ``P = X̂_1 … X̂_{ℓ-1}``; its rounding error costs ``‖P e_i‖²`` times
    as much, so the search weighs entries by those squared norms (exact on square
    butterflies, where they spread by 8× within a column at depth 10). Without the
    weights (``weigh_prefix=False``, the earlier sweep) the product error of radix-2
    chains was 1.1-1.5× higher (``benchmarks/quantize.py``).
    """
    pats = job.chain.patterns
    out = list(twiddles)
    scales: list[torch.Tensor | None] = [None] * len(out)
    weight = None
    for left in range(len(out) - 1):
        scales[left] = _search_pair(job, out, left, partner=left == len(out) - 2, weight=weight)
        if weigh_prefix:
            if weight is None:
                weight = torch.ones(pats[left].shape[0], dtype=out[left].dtype)
            quantized = job.fmt.fake(out[left], job.group_size, scales[left])
            weight = prefix_weights(pats[left], quantized, weight)
    return Rescaled(tuple(out), tuple(scales))


def descent(job: Job, twiddles: Sequence[torch.Tensor], passes: int = DESCENT_PASSES) -> Rescaled:
    """``descent``: ``left-to-right``, then ``passes`` sweeps of exact per-level re-solves,
    each given every other quantized factor (``quantization.descent``), which never raise
    the product error. Needs a float grid and a chain with one path per product entry
    (square butterflies); elsewhere it is ``left-to-right``. Every level of a sweep scans
    with the partner's rounding, as only the last pair of ``left-to-right`` does: on
    N=4096, L=12 at t=8 it took 3.2-5.0 s against 0.7-1.0 s, so it is not the default."""
    found = left_to_right(job, twiddles)
    t = job.fmt.significand_bits
    if t is None or len(twiddles) < 3 or not one_path_per_entry(job.chain):
        return found
    start = [job.fmt.fake(x, None, None) for x in found.twiddles]
    return Rescaled(tuple(descend(job.chain, twiddles, start, t, passes)), found.scales)


def equalize(job: Job, twiddles: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Function-preserving range equalisation, left to right.

    With scales per row (or group) of a block, row rescalings are free, so each
    factor's columns are brought to the same absolute maximum and the inverse goes
    into the next factor's rows. With one scale per tensor (or none), column ``j``
    of ``X_ℓ`` and row ``j`` of ``X_{ℓ+1}`` get the same range (cross-layer equalisation).
    """
    pats = job.chain.patterns
    out = list(twiddles)
    tiny = torch.finfo(torch.float64).tiny
    for left in range(len(out) - 1):
        col = cols(pats[left], out[left]).abs().amax(-1).clamp_min(tiny)  # (J,)
        if job.fmt.row_scaled(job.group_size):
            s = 1 / col
        else:
            row = rows(pats[left + 1], out[left + 1]).abs().amax(-1).clamp_min(tiny)
            s = (row / col).sqrt()
        s = s / s.log().mean().exp()  # keep the overall magnitude
        rescale_pair(job, out, left, s, 1 / s)
    return out


def learned(job: Job, twiddles: Sequence[torch.Tensor]) -> Rescaled:
    """``learned``: start from ``left-to-right`` and tune diagonals and scales on calibration data."""
    return learn(job, twiddles, left_to_right(job, twiddles))


def auto(job: Job, twiddles: Sequence[torch.Tensor]) -> Rescaled:
    """``auto``: run ``left-to-right`` and ``feedback`` and keep whichever of them and plain
    rounding has the lowest output error on held-out inputs when the job has them, else on
    the probes (the calibration inputs, or the identity, where it is the exact product
    error). Neither rescaling wins everywhere: the per-index search is best on small blocks
    (radix-2 int8), feedback on int4 and on wide blocks; and on MiniLM's int4 factors with
    calibration, after ``equalize+``, both lost to plain rounding on held-out inputs for
    some layers (layer 0 intermediate 0.158 against 0.145), so plain rounding stays a
    candidate and ``auto`` is never worse than it on what it is judged by. Judging on the
    rows ``feedback`` was fitted to would favour it wherever it over-fits them."""

    def stored(found: Rescaled) -> list[torch.Tensor]:
        return [job.fmt.fake(t, job.group_size, s) for t, s in zip(found.twiddles, found.scales)]

    if job.held_out_gram is not None:
        gram = job.held_out_gram.double()
        exact = job.chain.to_dense(list(twiddles))  # (m, n)

        def error(found: Rescaled) -> float:
            diff = exact - job.chain.to_dense(stored(found))
            return float(((diff @ gram) * diff).sum())

    else:
        inputs = probes(job)
        target = job.chain.apply(list(twiddles), inputs)  # (N, m)

        def error(found: Rescaled) -> float:
            return float((job.chain.apply(stored(found), inputs) - target).norm())

    return min((left_to_right(job, twiddles), feedback(job, twiddles), rtn(job, twiddles)), key=error)


Rescaling = Callable[[Job, Sequence[torch.Tensor]], Rescaled]
RESCALINGS: dict[str, Rescaling] = {
    "none": rtn,
    "optimal": optimal,
    "pairwise": pairwise,
    "left-to-right": left_to_right,
    "descent": descent,
    "learned": learned,
    "feedback": feedback,
    "auto": auto,
}
PRE_PASSES: dict[str, Callable[[Job, Sequence[torch.Tensor]], list[torch.Tensor]]] = {
    "equalize": equalize,
}


def resolve(name: str) -> tuple[list[str], str]:
    """Split ``equalize+left-to-right`` into pre-passes and the final rescaling."""
    parts = name.split("+")
    *pre, last = parts
    if last in PRE_PASSES:  # "equalize" alone: equalise, then round
        pre, last = parts, "none"
    bad = [p for p in pre if p not in PRE_PASSES] + ([last] if last not in RESCALINGS else [])
    if bad:
        raise InputError(
            f"unknown rescaling {name!r}: {', '.join(map(repr, bad))}; choose one of "
            f"{', '.join(RESCALINGS)}, optionally after {', '.join(p + '+' for p in PRE_PASSES)}"
        )
    return pre, last


def rescale(job: Job, twiddles: Sequence[torch.Tensor], name: str) -> Rescaled:
    """Run the rescaling ``name`` (``+``-joined pre-passes allowed) on float64 twiddles."""
    pre, last = resolve(name)
    out = list(twiddles)
    for step in pre:
        out = PRE_PASSES[step](job, out)
    return RESCALINGS[last](job, out)
