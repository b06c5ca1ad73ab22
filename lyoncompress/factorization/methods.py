"""Weight-space factorization of one layer: dense weight + method -> chosen factors.

A method is ``auto`` or a structure of the registry (``lyoncompress.structures``):
each of the structure's candidate chains is fitted by its weight-space fit, and the
one with the lowest relative weight error is kept; ``auto`` does this for every
structure of ``AUTO.weight``. The candidates measured are kept so the report can
say what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lyoncompress.butterfly import Chain
from lyoncompress.errors import InputError
from lyoncompress.factorization.projection import check_matrix
from lyoncompress.structures import AUTO, WeightFit, check_method, get_structure, max_params


@dataclass(frozen=True)
class Candidate:
    """A fit that was tried: its structure (a calibrated choice: its candidate label,
    see ``structures.CANDIDATES``), its size and its error (weight error, or held-out
    output error when chosen on calibration data)."""

    structure: str
    chain: str
    params: int
    rel_error: float


@dataclass(frozen=True)
class LayerFactors:
    """The factors chosen for one layer."""

    structure: str  # registry name of the winner (see ``structures.STRUCTURES``)
    chain: Chain
    twiddles: list[torch.Tensor]
    rel_error: float
    candidates: list[Candidate] = field(default_factory=list)
    lowrank_twiddles: list[torch.Tensor] = field(default_factory=list)
    output_error: float | None = None  # held-out, when chosen on calibration data
    # sequential calibration only: held-out error against the reference model's outputs,
    # earlier layers compressed (so it includes what reaches this layer from them)
    reference_error: float | None = None
    fit: str | None = None  # the winner's candidate label when chosen on calibration data
    # ``--distill-select-steps`` only: the best fit of each structure tried, by structure
    # name (each without ``families`` of its own), for the whole-model candidates
    families: dict[str, LayerFactors] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.chain.params + sum(t.numel() for t in self.lowrank_twiddles)


def prepared_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    """A weight ready to factorize: NaN/Inf and non-float weights are refused; float32
    carries the SVDs' ~1e-6 relative precision, far below any compression error, at half
    the memory of float64, so only float64 weights stay float64."""
    check_matrix(weight, name)
    if not weight.dtype.is_floating_point:
        raise InputError(f"{name}: dtype {weight.dtype} is not a float type")
    return weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def fit_weight(method: str, weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    """The lowest-weight-error factors of ``weight`` by ``method`` (``auto`` or a
    registered structure) within ``budget · m · n`` parameters.

    Example:
        >>> fit_weight("monarch", torch.randn(64, 32), 0.5, 2, "left-to-right").structure
        'monarch'
    """
    check_method(method)
    if method != "auto":
        return _best_of(method, weight, budget, depth, order)
    results = []
    for name in AUTO.weight:
        try:
            results.append(_best_of(name, weight, budget, depth, order))
        except InputError:
            continue  # a structure that cannot fit this shape is simply not a candidate
    if not results:
        raise InputError(f"no structure fits a {tuple(weight.shape)} weight at budget {budget}")
    best = min(results, key=lambda r: r.rel_error)
    tried = [c for r in results for c in r.candidates]
    return LayerFactors(
        best.structure, best.chain, best.twiddles, best.rel_error, tried, best.lowrank_twiddles
    )


def _best_of(name: str, weight: torch.Tensor, budget: float, depth: int, order: str) -> LayerFactors:
    structure = get_structure(name)
    m, n = weight.shape
    params = max_params(m, n, budget)
    best: WeightFit | None = None
    tried = []
    for chain in structure.chains(m, n, budget, depth):
        fit = structure.weight_fit(weight, chain, params, order)
        size = chain.params + sum(t.numel() for t in fit.lowrank_twiddles)
        tried.append(Candidate(name, str(chain), size, fit.rel_error))
        if best is None or fit.rel_error < best.rel_error:
            best = fit
    if best is None:
        raise InputError(f"no {name} structure fits the budget")
    return LayerFactors(name, best.chain, best.twiddles, best.rel_error, tried, best.lowrank_twiddles)
