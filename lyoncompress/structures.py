"""The structure registry: every way a weight can be replaced, by name.

Owns ``STRUCTURES`` (name -> ``Structure``), the ``AUTO`` sets, the one
rank-from-budget rule (``rank_for_budget``), every structure's candidate chains,
its weight-space fit and, where it has one, its calibrated fit, and the calibrated
choice between them (``choose_structure``). A structure's ``name`` is the string a
recipe's ``method``, a report row's ``structure`` and an artifact layer's
``structure`` all use. Adding a structure is adding one entry to ``STRUCTURES``.

Structures (parameters of an ``m x n`` weight at a budget fraction ``β``:
at most ``int(β · m · n)``):

* ``lowrank`` ``U V``: the largest rank within the budget. Weight space: truncated
  SVD; calibrated: activation-aware SVD (``activation_aware_lowrank``).
* ``monarch`` ``X_1 X_2`` with ``k`` blocks, ``k · r · (m + n)`` parameters. Weight
  space: projection; calibrated: activation-aware projection, refined.
* ``butterfly``: chains of ``depth`` factors that fill the budget. Weight space:
  projection; calibrated: as Monarch, activation-aware projection then
  ``refine_layer``.
* ``hybrid`` ``X_1 X_2 + U V``: a share of the budget (half by default) to a
  low-rank term fitted to what the Monarch part misses. Weight space: project onto
  the Monarch chain, SVD of the residual, a few alternations; calibrated:
  activation-aware starts (``hybrid_start``), refined jointly. A second calibrated
  fit, ``hybrid-search``, searches the geometry (input/output block counts, KS rank
  against low rank at the layer's budget) and fits it by variable projection +
  L-BFGS (``refine.varpro``); its report row lists every geometry tried. It is
  ``auto``'s structured calibrated candidate.

In a calibrated candidate table each fit has a label: ``Structure.labels`` gives
(weight-space fit, calibrated fit), e.g. ``lowrank`` / ``lowrank-aware`` and
``monarch-projection`` / ``monarch``; ``CANDIDATES`` maps every label to its
structure and fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain, budget_patterns, lowrank, monarch
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization.projection import check_matrix, project
from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.gram import Whitening, check_gram, output_energy, output_error
from lyoncompress.refine.layerwise import least_squares_error, refine_layer
from lyoncompress.refine.varpro import search_geometry

CANDIDATES_PER_METHOD = 6  # weight-space candidate chains per structure
HYBRID_ALTERNATIONS = 8  # weight-space hybrid: projection / residual-SVD rounds after the start
LOWRANK_SHARE = 0.5  # budget share of the hybrid's low-rank term


def max_params(m: int, n: int, budget: float) -> int:
    """The parameter count a budget fraction allows: ``int(budget · m · n)``."""
    return int(budget * m * n)


def rank_for_params(m: int, n: int, params: int) -> int:
    """The largest ``r <= min(m, n)`` with ``r · (m + n) <= params``; 0 when none fits.

    A Monarch with ``k`` blocks costs ``k · (m + n)`` per unit of rank, so its rank
    is ``rank_for_params(m, n, params) // k``.
    """
    return min(params // (m + n), m, n)


def rank_for_budget(m: int, n: int, budget: float) -> int:
    """The low-rank rank at a budget fraction: the largest ``r <= min(m, n)`` with
    ``r · (m + n) <= int(budget · m · n)``; 0 when none fits.

    Example:
        >>> rank_for_budget(64, 32, 0.5)
        10
    """
    return rank_for_params(m, n, max_params(m, n, budget))


@dataclass(frozen=True)
class WeightFit:
    """A weight-space fit: ``chain`` twiddles, an optional low-rank term
    ``[U (1, 1, m, r), V (1, 1, r, n)]`` and the relative weight error ``‖W-Ŵ‖/‖W‖``."""

    chain: Chain
    twiddles: list[torch.Tensor]
    lowrank_twiddles: list[torch.Tensor]
    rel_error: float


@dataclass(frozen=True)
class Fitted:
    """One candidate of a calibrated choice: ``chain`` twiddles plus an optional
    low-rank term, judged by ``val_error``, the held-out relative output error.

    ``name`` is its label in the candidate table, ``structure`` its registry name.
    Feeds ``ButterflyLinear.from_twiddles(chain, twiddles, bias, lowrank_twiddles or None)``.
    """

    name: str
    structure: str
    chain: Chain
    twiddles: list[torch.Tensor]
    lowrank_twiddles: list[torch.Tensor]
    params: int
    val_error: float
    tried: tuple[tuple[str, int, float], ...] = ()  # a search's (what, params, val_error)

    @property
    def lowrank_rank(self) -> int:
        return _rank(self.lowrank_twiddles)


@dataclass(frozen=True)
class StructureChoice:
    """The chosen candidate and every candidate tried (lowest ``val_error`` first)."""

    chosen: Fitted
    candidates: list[Fitted]


@dataclass(frozen=True)
class FitContext:
    """What every calibrated fit of one layer shares."""

    weight: torch.Tensor
    gram_train: torch.Tensor
    gram_val: torch.Tensor
    budget: float
    max_params: int
    depth: int
    steps: int
    sweeps: int
    blocks: tuple[int, ...]
    lowrank_share: float
    whitening: Whitening  # of gram_train, shared by every refinement of the layer
    val_energy: float  # output_energy(weight, gram_val), shared by every judgement


Start = tuple[Chain, list[torch.Tensor], list[torch.Tensor]]  # chain, twiddles, low-rank twiddles


@dataclass(frozen=True)
class Searched:
    """What a searching calibrated fit returns: the winner and what it tried
    (``(description, params, held-out error)``, best first)."""

    start: Start
    tried: tuple[tuple[str, int, float], ...]


CalibratedFit = Callable[["FitContext", list[Chain]], "Start | Searched | None"]


@dataclass(frozen=True)
class Structure:
    """A registered structure.

    Attributes:
        name: the string in recipes (``method``), reports and artifacts (``structure``).
        chains: weight-space candidate chains ``(m, n, budget, depth) -> [Chain]``;
            raises ``InputError`` when none fits.
        weight_fit: ``(weight, chain, max_params, order) -> WeightFit`` for one chain.
        calibrated_chains: the chains a calibrated choice starts from
            (``FitContext -> [Chain]``, empty when none fits).
        calibrated_fit: ``(context, chains) -> (chain, twiddles, lowrank_twiddles)``
            fitted on calibration data (None when no chain fits), or None when the
            structure has no calibrated fit.
        labels: (weight-space fit, calibrated fit) labels in a calibrated candidate table.
        more_fits: further calibrated fits as ``(label, fit)``, called like
            ``calibrated_fit``; a fit may return ``Searched`` to report what it tried.
    """

    name: str
    chains: Callable[[int, int, float, int], list[Chain]]
    weight_fit: Callable[[torch.Tensor, Chain, int, str], WeightFit]
    calibrated_chains: Callable[[FitContext], list[Chain]]
    calibrated_fit: CalibratedFit | None
    labels: tuple[str, str]
    more_fits: tuple[tuple[str, CalibratedFit], ...] = ()


# ---- candidate chains -----------------------------------------------------------------


def lowrank_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Truncated SVD at the largest rank within the budget (rank 1 at least)."""
    return [lowrank(m, n, max(1, rank_for_budget(m, n, budget)))]


def monarch_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Monarch ``(1, m/k, k·r, k) (k, k·r, n/k, 1)``: ``k·r·(m+n)`` parameters; the block
    counts nearest ``√min(m, n)`` with the largest rank that fits."""
    width = rank_for_budget(m, n, budget)  # k·r must not exceed this
    g = math.gcd(m, n)
    blocks = [k for k in range(2, g + 1) if g % k == 0 and k <= width]
    if not blocks:
        raise InputError(f"no Monarch structure fits a {m}x{n} weight at budget {budget}")
    target = math.sqrt(min(m, n))
    blocks.sort(key=lambda k: abs(math.log(k / target)))
    return [monarch(m, n, k, width // k) for k in blocks[:CANDIDATES_PER_METHOD]]


def butterfly_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Chains of ``depth`` factors with a uniform rank that fill the budget: the few with
    the most parameters and the most balanced blocks."""
    try:
        full = [patterns for _, patterns in budget_patterns(m, n, depth, max_params(m, n, budget), fill=0.9)]
    except PatternError as err:
        raise InputError(str(err)) from err
    full.sort(key=lambda patterns: max(max(b, c) for _, b, c, _ in patterns))  # stable
    return [Chain.of(*patterns) for patterns in full[:CANDIDATES_PER_METHOD]]


def hybrid_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """The Monarch parts of hybrids: Monarch chains at ``1 - LOWRANK_SHARE`` of the budget."""
    return monarch_chains(m, n, (1 - LOWRANK_SHARE) * budget, depth)


def monarch_within(m: int, n: int, blocks: int, params: int) -> Chain:
    """The highest-rank ``monarch(m, n, blocks, r)`` with at most ``params`` parameters."""
    rank = rank_for_params(m, n, params) // blocks
    if rank < 1:
        raise PatternError(f"no Monarch with {blocks} blocks fits {params} parameters for {m}x{n}")
    return monarch(m, n, blocks, rank)


def _blocks_within(context: FitContext, share: float) -> list[Chain]:
    m, n = context.weight.shape
    params = int(share * context.max_params)
    return [
        monarch_within(m, n, k, params)
        for k in context.blocks
        if m % k == 0 and n % k == 0 and rank_for_params(m, n, params) >= k
    ]


def _lowrank_calibrated_chains(context: FitContext) -> list[Chain]:
    m, n = context.weight.shape
    rank = rank_for_params(m, n, context.max_params)
    return [lowrank(m, n, rank)] if rank >= 1 else []


def _monarch_calibrated_chains(context: FitContext) -> list[Chain]:
    return _blocks_within(context, 1.0)


def _hybrid_calibrated_chains(context: FitContext) -> list[Chain]:
    return _blocks_within(context, 1 - context.lowrank_share)


def _butterfly_calibrated_chains(context: FitContext) -> list[Chain]:
    m, n = context.weight.shape
    try:
        return butterfly_chains(m, n, context.budget, context.depth)
    except InputError:
        return []


# ---- weight-space fits ----------------------------------------------------------------


def projected(weight: torch.Tensor, chain: Chain, params: int, order: str) -> WeightFit:
    """The chain's projection (``project``); ``params`` is not used: the chain fits."""
    fit = project(weight, chain, order)
    return WeightFit(fit.chain, fit.twiddles, [], fit.rel_error)


def hybrid_weight_fit(weight: torch.Tensor, chain: Chain, params: int, order: str) -> WeightFit:
    """Monarch ``B`` plus rank-``r`` ``U V`` with ``r`` from what ``chain`` leaves of
    ``params``: ``B`` = projection of ``W``, ``U V`` = truncated SVD of ``W - B``, then
    ``HYBRID_ALTERNATIONS`` rounds of ``B`` = projection of ``W - U V`` and ``U V`` =
    SVD of ``W - B``; the lowest weight error seen is kept, so it is never worse than
    the projection onto ``chain`` alone."""
    m, n = weight.shape
    rank = rank_for_params(m, n, params - chain.params)
    start = projected(weight, chain, params, order)
    if rank < 1:
        return start
    low_chain = lowrank(m, n, rank)
    norm = weight.norm().clamp_min(1e-30)
    best, twiddles, low = start, start.twiddles, []
    for round_ in range(HYBRID_ALTERNATIONS + 1):
        if round_:
            twiddles = project(weight - low_chain.to_dense(low), chain, order).twiddles
        structured = chain.to_dense(twiddles)  # (m, n)
        low = project(weight - structured, low_chain).twiddles
        error = float((weight - structured - low_chain.to_dense(low)).norm() / norm)
        if error < best.rel_error:
            best = WeightFit(chain, twiddles, low, error)
    return best


# ---- calibrated fits ------------------------------------------------------------------


def hybrid_start(
    weight: torch.Tensor,
    gram: torch.Tensor,
    max_params: int,
    blocks: int,
    lowrank_share: float = LOWRANK_SHARE,
) -> Start:
    """Split ``max_params`` between ``monarch(m, n, blocks, r)`` and a low-rank term.

    The Monarch part gets ``(1 - lowrank_share) · max_params`` and starts from the
    activation-aware projection; the low-rank term gets what is left and starts
    from the activation-aware SVD of the residual ``W - B``.

    Returns:
        ``(chain, twiddles, lowrank_twiddles)``; ``lowrank_twiddles`` is ``[]`` when
        no rank fits. Raises ``PatternError`` when no Monarch rank fits.
    """
    m, n = weight.shape
    chain = monarch_within(m, n, blocks, int((1 - lowrank_share) * max_params))
    twiddles = activation_aware_projection(weight, chain, gram)
    rank = rank_for_params(m, n, max_params - chain.params)
    if rank < 1:
        return chain, twiddles, []
    return chain, twiddles, activation_aware_lowrank(weight - chain.to_dense(twiddles), gram, rank)


def _fitted(
    context: FitContext,
    label: str,
    structure: str,
    chain: Chain,
    twiddles: list[torch.Tensor],
    low: list[torch.Tensor],
) -> Fitted:
    dense = chain.to_dense(twiddles)
    if low:
        dense = dense + lowrank(*chain.shape, low[0].shape[-1]).to_dense(low)
    params = chain.params + sum(t.numel() for t in low)  # U (m, r) and V (r, n)
    error = output_error(context.weight, dense, context.gram_val, context.val_energy)
    return Fitted(label, structure, chain, twiddles, low, params, error)


def _rank(low: list[torch.Tensor]) -> int:
    return low[0].shape[-1] if low else 0


def _start_error(
    context: FitContext, chain: Chain, twiddles: list[torch.Tensor], low: list[torch.Tensor]
) -> float:
    """Held-out error after one exact least-squares step: cheap enough to rank starts."""
    return least_squares_error(
        context.weight, chain, twiddles, context.gram_train, context.gram_val, low or None, context.whitening
    )


def _refined(context: FitContext, starts: list[Start]) -> Start | None:
    """The start with the lowest ``_start_error``, refined by ``refine_layer``."""
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
    return chain, result.twiddles, result.lowrank_twiddles


def _aware_lowrank(context: FitContext, chains: list[Chain]) -> Start | None:
    """The activation-aware SVD at the chain's rank (no refinement: it is optimal)."""
    if not chains:
        return None
    chain = chains[0]
    # the layer's whitening is the Cholesky factor of gram_train this fit needs (same damping)
    chol, rank = context.whitening.chol, chain.patterns[0].c
    return chain, activation_aware_lowrank(context.weight, context.gram_train, rank, chol=chol), []


def _refined_chains(context: FitContext, chains: list[Chain]) -> Start | None:
    """Activation-aware projections onto each chain; the best start refined."""
    starts = [(c, activation_aware_projection(context.weight, c, context.gram_train), []) for c in chains]
    return _refined(context, starts)


def _refined_hybrid(context: FitContext, chains: list[Chain]) -> Start | None:
    """``hybrid_start`` for each Monarch part; the best start refined jointly."""
    starts = [
        hybrid_start(
            context.weight, context.gram_train, context.max_params, c.patterns[0].d, context.lowrank_share
        )
        for c in chains
    ]
    return _refined(context, starts)


def _searched_hybrid(context: FitContext, chains: list[Chain]) -> Searched | None:
    """``search_geometry``: Monarch + low-rank geometries at the layer's whole budget,
    ranked by a short variable-projection fit, the best fitted with ``context.steps``
    L-BFGS iterations (``chains`` is not used: the search makes its own)."""
    found = search_geometry(
        context.weight,
        context.gram_train,
        context.gram_val,
        context.max_params,
        iterations=context.steps,
        whitening=context.whitening,
    )
    if found is None:
        return None
    fit = found.best
    # the winning geometry is the candidate row itself (judged there in the layer's dtype)
    tried = tuple(
        (f"{t.geometry} ({t.iterations} it)", t.params, t.val_error)
        for t in found.tried
        if t.geometry != found.geometry
    )
    return Searched((fit.chain, fit.twiddles, fit.lowrank_twiddles), tried)


STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in (
        Structure(
            "lowrank", lowrank_chains, projected, _lowrank_calibrated_chains, _aware_lowrank,
            ("lowrank", "lowrank-aware"),
        ),
        Structure(
            "monarch", monarch_chains, projected, _monarch_calibrated_chains, _refined_chains,
            ("monarch-projection", "monarch"),
        ),
        Structure(
            "butterfly", butterfly_chains, projected, _butterfly_calibrated_chains,
            _refined_chains, ("butterfly-projection", "butterfly"),
        ),
        Structure(
            "hybrid", hybrid_chains, hybrid_weight_fit, _hybrid_calibrated_chains, _refined_hybrid,
            ("hybrid-projection", "hybrid"), (("hybrid-search", _searched_hybrid),),
        ),
    )
}  # fmt: skip

# calibrated candidate label -> (structure, fit): "weight", "calibrated" or a ``more_fits`` label
CANDIDATES: dict[str, tuple[str, str]] = {
    **{
        label: (s.name, fit)
        for s in STRUCTURES.values()
        for label, fit in zip(s.labels, ("weight", "calibrated"))
        if fit == "weight" or s.calibrated_fit is not None
    },
    **{label: (s.name, label) for s in STRUCTURES.values() for label, _ in s.more_fits},
}


@dataclass(frozen=True)
class Auto:
    """What ``method: auto`` tries: ``weight`` the structures compared by weight error
    (no calibration data), ``calibrated`` the candidate labels compared by held-out
    output error. The calibrated set is the data-free and activation-aware low rank,
    the Monarch projection, and the geometry-searched hybrid (``hybrid-search``). On
    MiniLM's 12 MLP matrices at 50% and 25% this set's choice is never worse than that
    of the set with the Adam-refined Monarch and hybrid instead (better on 23 of 24,
    benchmarks/RESULTS.md, issue 16), and those two took ~95% of its time, so they
    left the set; ``--method monarch`` / ``--method hybrid`` still fit
    them. The refined butterfly and the weight-space fits of butterfly and hybrid are
    not in the calibrated set, the hybrid not in the weight-space set."""

    weight: tuple[str, ...]
    calibrated: tuple[str, ...]


AUTO = Auto(
    weight=("butterfly", "monarch", "lowrank"),
    calibrated=("lowrank", "lowrank-aware", "monarch-projection", "hybrid-search"),
)
METHODS = ("auto", *STRUCTURES)  # what a recipe's ``method`` may name


def get_structure(name: str) -> Structure:
    """The registered structure ``name``; an unknown name raises ``InputError``."""
    if name not in STRUCTURES:
        raise InputError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}")
    return STRUCTURES[name]


def check_method(name: str) -> None:
    """Refuse a recipe ``method`` that is neither ``auto`` nor a registered structure."""
    if name != "auto":
        get_structure(name)


def calibrated_candidates(method: str) -> tuple[str, ...]:
    """The candidate labels a calibrated choice tries for a recipe ``method``: the
    ``AUTO.calibrated`` set, or the structure's calibrated fits (its weight-space fit
    when it has none), the best on held-out rows kept."""
    if method == "auto":
        return AUTO.calibrated
    structure = get_structure(method)
    first = structure.labels[1] if structure.calibrated_fit is not None else structure.labels[0]
    return (first, *(label for label, _ in structure.more_fits))


def choose_structure(
    weight: torch.Tensor,
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    budget: float,
    candidates: Sequence[str] = AUTO.calibrated,
    steps: int = 300,
    sweeps: int = 0,
    blocks: Sequence[int] = (2, 4, 8),
    lowrank_share: float = LOWRANK_SHARE,
    depth: int = 2,
) -> StructureChoice:
    """Fit each candidate at ``<= budget · m · n`` parameters and keep the one with
    the lowest held-out output error.

    Args:
        weight: ``(m, n)`` weight of an ``nn.Linear``.
        gram_train, gram_val: input second moments to fit and to judge
            (``LayerCalibration.gram_train`` / ``gram_val``).
        budget: fraction of the dense parameter count, in ``(0, 1]``.
        candidates: labels from ``CANDIDATES``.
        steps: Adam steps of each refinement.
        sweeps: alternating least-squares sweeps of each refinement (see ``refine_layer``).
        blocks: Monarch block counts tried (those dividing ``m`` and ``n``).
        lowrank_share: budget share of the low-rank term in the hybrid.
        depth: factors of butterfly chains.

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
    context = FitContext(
        weight,
        gram_train,
        gram_val,
        budget,
        max_params(m, n, budget),
        depth,
        steps,
        sweeps,
        tuple(blocks),
        lowrank_share,
        Whitening.of(gram_train),
        output_energy(weight, gram_val),
    )
    built = [s for s in (_candidate(context, label) for label in candidates) if s is not None]
    if not built:
        raise InputError(f"no candidate fits {budget:.0%} of a {m}x{n} weight; raise the budget")
    built.sort(key=lambda s: s.val_error)
    return StructureChoice(built[0], built)


def _candidate(context: FitContext, label: str) -> Fitted | None:
    name, fit = CANDIDATES[label]
    structure = STRUCTURES[name]
    chains = structure.calibrated_chains(context)
    tried: tuple[tuple[str, int, float], ...] = ()
    if fit == "calibrated":
        start = structure.calibrated_fit(context, chains)
    elif fit != "weight":
        start = dict(structure.more_fits)[fit](context, chains)
        if isinstance(start, Searched):
            start, tried = start.start, start.tried
    else:  # the weight-space fit with the lowest weight error, judged on outputs
        fits = [structure.weight_fit(context.weight, c, context.max_params, "left-to-right") for c in chains]
        best = min(fits, key=lambda f: f.rel_error, default=None)
        start = None if best is None else (best.chain, best.twiddles, best.lowrank_twiddles)
    if start is None:
        return None
    return dataclasses.replace(_fitted(context, label, name, *start), tried=tried)
