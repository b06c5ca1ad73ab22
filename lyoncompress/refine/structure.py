"""Per-layer structure choice at a parameter budget: low rank, Monarch, or both.

Every candidate is built at ``<= budget · m · n`` parameters and judged by its
held-out relative output error; the lowest wins, and the whole table is
returned so a report can say what was chosen and why. Candidates live in the
``CANDIDATES`` registry (name -> builder).

The hybrid ``X_1 X_2 + U V`` gives a share of the budget to a rank-``r`` term
fitted to what the Monarch part misses (activation-aware SVD of ``W - B``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain, lowrank, monarch
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization import check_matrix, project
from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.gram import Whitening, check_gram, output_energy, output_error
from lyoncompress.refine.layerwise import least_squares_error, refine_layer


@dataclass(frozen=True)
class Structure:
    """One way to replace a weight: ``chain`` twiddles plus an optional low-rank term.

    Feeds ``ButterflyLinear.from_twiddles(chain, twiddles, bias, lowrank_twiddles or None)``.
    ``val_error`` is the held-out relative output error.
    """

    name: str
    chain: Chain
    twiddles: list[torch.Tensor]
    lowrank_twiddles: list[torch.Tensor]
    params: int
    val_error: float

    @property
    def lowrank_rank(self) -> int:
        return _rank(self.lowrank_twiddles)


@dataclass(frozen=True)
class StructureChoice:
    """The chosen structure and every candidate tried (lowest ``val_error`` first)."""

    chosen: Structure
    candidates: list[Structure]


@dataclass(frozen=True)
class _Context:
    weight: torch.Tensor
    gram_train: torch.Tensor
    gram_val: torch.Tensor
    max_params: int
    steps: int
    sweeps: int
    blocks: tuple[int, ...]
    lowrank_share: float
    whitening: Whitening  # of gram_train, shared by every refinement of the layer
    val_energy: float  # output_energy(weight, gram_val), shared by every judgement


def hybrid_start(
    weight: torch.Tensor,
    gram: torch.Tensor,
    max_params: int,
    blocks: int,
    lowrank_share: float = 0.5,
) -> tuple[Chain, list[torch.Tensor], list[torch.Tensor]]:
    """Split ``max_params`` between ``monarch(m, n, blocks, r)`` and a low-rank term.

    The Monarch part gets ``(1 - lowrank_share) · max_params`` and starts from the
    activation-aware projection; the low-rank term gets what is left and starts
    from the activation-aware SVD of the residual ``W - B``.

    Returns:
        ``(chain, twiddles, lowrank_twiddles)``; ``lowrank_twiddles`` is ``[]`` when
        no rank fits. Raises ``PatternError`` when no Monarch rank fits.
    """
    m, n = weight.shape
    chain = _monarch_within(m, n, blocks, int((1 - lowrank_share) * max_params))
    twiddles = activation_aware_projection(weight, chain, gram)
    rank = min((max_params - chain.params) // (m + n), m, n)
    if rank < 1:
        return chain, twiddles, []
    return chain, twiddles, activation_aware_lowrank(weight - chain.to_dense(twiddles), gram, rank)


def choose_structure(
    weight: torch.Tensor,
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    budget: float,
    candidates: Sequence[str] = ("lowrank", "lowrank-aware", "monarch-projection", "monarch", "hybrid"),
    steps: int = 300,
    sweeps: int = 0,
    blocks: Sequence[int] = (2, 4, 8),
    lowrank_share: float = 0.5,
) -> StructureChoice:
    """Build each candidate at ``<= budget · m · n`` parameters and keep the one with
    the lowest held-out output error.

    Args:
        weight: ``(m, n)`` weight of an ``nn.Linear``.
        gram_train, gram_val: input second moments to fit and to judge
            (``LayerCalibration.gram_train`` / ``gram_val``).
        budget: fraction of the dense parameter count, in ``(0, 1]``.
        candidates: names from ``CANDIDATES``.
        steps: Adam steps of each refinement.
        sweeps: alternating least-squares sweeps of each refinement (see ``refine_layer``).
        blocks: Monarch block counts tried (those dividing ``m`` and ``n``).
        lowrank_share: budget share of the low-rank term in the hybrid.

    Returns:
        ``StructureChoice``; candidates that do not fit the budget are left out.

    Example:
        >>> choice = choose_structure(w, calib.gram_train, calib.gram_val, budget=0.5)
        >>> choice.chosen.name, [(c.name, c.params, c.val_error) for c in choice.candidates]
    """
    check_matrix(weight, "weight")
    m, n = weight.shape
    check_gram(gram_train, n, "gram_train")
    check_gram(gram_val, n, "gram_val")
    if not 0 < budget <= 1:
        raise InputError(f"budget {budget} must be a fraction of the dense parameters in (0, 1]")
    unknown = [name for name in candidates if name not in CANDIDATES]
    if unknown:
        raise InputError(f"unknown candidate(s) {unknown}; registered: {', '.join(CANDIDATES)}")
    context = _Context(
        weight,
        gram_train,
        gram_val,
        int(budget * m * n),
        steps,
        sweeps,
        tuple(blocks),
        lowrank_share,
        Whitening.of(gram_train),
        output_energy(weight, gram_val),
    )
    built = [s for s in (CANDIDATES[name](context) for name in candidates) if s is not None]
    if not built:
        raise InputError(f"no candidate fits {budget:.0%} of a {m}x{n} weight; raise the budget")
    built.sort(key=lambda s: s.val_error)
    return StructureChoice(built[0], built)


def _monarch_within(m: int, n: int, blocks: int, max_params: int) -> Chain:
    """The highest-rank ``monarch(m, n, blocks, r)`` with at most ``max_params``."""
    rank = min(max_params // (blocks * (m + n)), m // blocks, n // blocks)
    if rank < 1:
        raise PatternError(f"no Monarch with {blocks} blocks fits {max_params} parameters for {m}x{n}")
    return monarch(m, n, blocks, rank)


def _lowrank_rank(context: _Context) -> int:
    m, n = context.weight.shape
    return min(context.max_params // (m + n), m, n)


def _structure(
    context: _Context, name: str, chain: Chain, twiddles: list[torch.Tensor], low: list[torch.Tensor]
) -> Structure:
    dense = chain.to_dense(twiddles)
    if low:
        dense = dense + lowrank(*chain.shape, low[0].shape[-1]).to_dense(low)
    params = chain.params + sum(t.numel() for t in low)  # U (m, r) and V (r, n)
    error = output_error(context.weight, dense, context.gram_val, context.val_energy)
    return Structure(name, chain, twiddles, low, params, error)


def _fitting_blocks(context: _Context, share: float) -> list[Chain]:
    m, n = context.weight.shape
    chains = []
    for k in context.blocks:
        if m % k == 0 and n % k == 0 and share * context.max_params >= k * (m + n):
            chains.append(_monarch_within(m, n, k, int(share * context.max_params)))
    return chains


def _plain_lowrank(context: _Context) -> Structure | None:
    m, n = context.weight.shape
    rank = _lowrank_rank(context)
    if rank < 1:
        return None
    chain = lowrank(m, n, rank)
    return _structure(context, "lowrank", chain, project(context.weight, chain).twiddles, [])


def _aware_lowrank(context: _Context) -> Structure | None:
    m, n = context.weight.shape
    rank = _lowrank_rank(context)
    if rank < 1:
        return None
    twiddles = activation_aware_lowrank(context.weight, context.gram_train, rank)
    return _structure(context, "lowrank-aware", lowrank(m, n, rank), twiddles, [])


def _monarch_projection(context: _Context) -> Structure | None:
    """Data-free baseline: plain projection, block count by weight-space error."""
    projections = [project(context.weight, chain) for chain in _fitting_blocks(context, 1.0)]
    if not projections:
        return None
    best = min(projections, key=lambda p: p.rel_error)
    return _structure(context, "monarch-projection", best.chain, best.twiddles, [])


def _rank(low: list[torch.Tensor]) -> int:
    return low[0].shape[-1] if low else 0


def _start_error(
    context: _Context, chain: Chain, twiddles: list[torch.Tensor], low: list[torch.Tensor]
) -> float:
    """Held-out error after one exact least-squares step: cheap enough to rank starts."""
    return least_squares_error(
        context.weight, chain, twiddles, context.gram_train, context.gram_val, low or None, context.whitening
    )


def _refined(
    context: _Context, name: str, starts: list[tuple[Chain, list[torch.Tensor], list[torch.Tensor]]]
) -> Structure | None:
    if not starts:
        return None
    chain, twiddles, low = (
        starts[0] if len(starts) == 1 else min(starts, key=lambda s: _start_error(context, *s))
    )
    result = refine_layer(
        context.weight,
        chain,
        twiddles,
        context.gram_train,
        context.gram_val,
        steps=context.steps,
        sweeps=context.sweeps,
        lowrank_rank=_rank(low),
        lowrank_init=low or None,
        whitening=context.whitening,
    )
    return _structure(context, name, chain, result.twiddles, result.lowrank_twiddles)


def _monarch_refined(context: _Context) -> Structure | None:
    starts = [
        (chain, activation_aware_projection(context.weight, chain, context.gram_train), [])
        for chain in _fitting_blocks(context, 1.0)
    ]
    return _refined(context, "monarch", starts)


def _hybrid_refined(context: _Context) -> Structure | None:
    chains = _fitting_blocks(context, 1 - context.lowrank_share)
    starts = [
        hybrid_start(
            context.weight, context.gram_train, context.max_params, chain.patterns[0].d, context.lowrank_share
        )
        for chain in chains
    ]
    return _refined(context, "hybrid", starts)


CANDIDATES: dict[str, Callable[[_Context], Structure | None]] = {
    "lowrank": _plain_lowrank,
    "lowrank-aware": _aware_lowrank,
    "monarch-projection": _monarch_projection,
    "monarch": _monarch_refined,
    "hybrid": _hybrid_refined,
}
