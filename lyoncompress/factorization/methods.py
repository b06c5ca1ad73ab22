"""Factorization methods (a registry): dense weight + layer options -> chosen factors.

Each method tries a few structures that fit the layer's parameter budget, projects
the weight onto each, and keeps the one with the lowest relative weight error. The
candidates it measured are kept so the report can say what was chosen and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lyoncompress.butterfly import Chain, budget_chains, lowrank, monarch
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization.projection import check_matrix, project

CANDIDATES_PER_METHOD = 6


@dataclass(frozen=True)
class Candidate:
    """A structure that was tried: what it was, its size and its error (weight error,
    or held-out output error when chosen on calibration data)."""

    structure: str
    chain: str
    params: int
    rel_error: float


@dataclass(frozen=True)
class LayerFactors:
    """The factors chosen for one layer."""

    structure: str  # method that produced the winner: butterfly | monarch | lowrank
    chain: Chain
    twiddles: list[torch.Tensor]
    rel_error: float
    candidates: list[Candidate] = field(default_factory=list)
    lowrank_twiddles: list[torch.Tensor] = field(default_factory=list)
    output_error: float | None = None  # held-out, when chosen on calibration data
    # sequential calibration only: held-out error against the reference model's outputs,
    # earlier layers compressed (so it includes what reaches this layer from them)
    reference_error: float | None = None

    @property
    def params(self) -> int:
        return self.chain.params + sum(t.numel() for t in self.lowrank_twiddles)


Method = Callable[[torch.Tensor, float, int, str], LayerFactors]


def prepared_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    """A weight ready to factorize: NaN/Inf and non-float weights are refused; float32
    carries the SVDs' ~1e-6 relative precision, far below any compression error, at half
    the memory of float64, so only float64 weights stay float64."""
    check_matrix(weight, name)
    if not weight.dtype.is_floating_point:
        raise InputError(f"{name}: dtype {weight.dtype} is not a float type")
    return weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def _best_of(structure: str, weight: torch.Tensor, chains: list[Chain], order: str) -> LayerFactors:
    best, tried = None, []
    for chain in chains:
        projection = project(weight, chain, order)
        tried.append(Candidate(structure, str(chain), chain.params, projection.rel_error))
        if best is None or projection.rel_error < best.rel_error:
            best = projection
    if best is None:
        raise InputError(f"no {structure} structure fits the budget")
    return LayerFactors(structure, best.chain, best.twiddles, best.rel_error, tried)


def lowrank_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Truncated SVD at the largest rank within the budget."""
    rank = max(1, math.floor(budget * m * n / (m + n)))
    return [lowrank(m, n, min(rank, m, n))]


def monarch_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Monarch ``(1, m/k, k·r, k) (k, k·r, n/k, 1)``: ``k·r·(m+n)`` parameters; the block
    counts nearest ``√min(m, n)`` with the largest rank that fits."""
    width = budget * m * n / (m + n)  # k·r must not exceed this
    blocks = [k for k in range(2, math.gcd(m, n) + 1) if math.gcd(m, n) % k == 0 and k <= width]
    if not blocks:
        raise InputError(f"no Monarch structure fits a {m}x{n} weight at budget {budget}")
    target = math.sqrt(min(m, n))
    blocks.sort(key=lambda k: abs(math.log(k / target)))
    return [monarch(m, n, k, max(1, math.floor(width / k))) for k in blocks[:CANDIDATES_PER_METHOD]]


def butterfly_chains(m: int, n: int, budget: float, depth: int) -> list[Chain]:
    """Chains of ``depth`` factors with a uniform rank that fill the budget: the few with
    the most parameters and the most balanced blocks."""
    try:
        chains = budget_chains(m, n, depth, int(budget * m * n))
    except PatternError as err:
        raise InputError(str(err)) from err
    most = chains[0].params
    full = [c for c in chains if c.params >= 0.9 * most]
    full.sort(key=lambda c: max(max(p.b, p.c) for p in c.patterns))
    return full[:CANDIDATES_PER_METHOD]


def lowrank_method(weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    return _best_of("lowrank", weight, lowrank_chains(*weight.shape, budget, depth), order)


def monarch_method(weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    return _best_of("monarch", weight, monarch_chains(*weight.shape, budget, depth), order)


def butterfly_method(weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    return _best_of("butterfly", weight, butterfly_chains(*weight.shape, budget, depth), order)


def auto_method(weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    """Every other method; the lowest weight error wins."""
    results = []
    for name, method in METHODS.items():
        if name == "auto":
            continue
        try:
            results.append(method(weight, budget, depth, order))
        except InputError:
            continue  # a structure that cannot fit this shape is simply not a candidate
    if not results:
        raise InputError(f"no structure fits a {tuple(weight.shape)} weight at budget {budget}")
    best = min(results, key=lambda r: r.rel_error)
    tried = [c for r in results for c in r.candidates]
    return LayerFactors(best.structure, best.chain, best.twiddles, best.rel_error, tried)


METHODS: dict[str, Method] = {
    "auto": auto_method,
    "butterfly": butterfly_method,
    "monarch": monarch_method,
    "lowrank": lowrank_method,
}


# the candidate chains of each weight-space method, by name ("auto" tries them all)
CHAINS: dict[str, Callable[[int, int, float, int], list[Chain]]] = {
    "butterfly": butterfly_chains,
    "monarch": monarch_chains,
    "lowrank": lowrank_chains,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}")
    return METHODS[name]
