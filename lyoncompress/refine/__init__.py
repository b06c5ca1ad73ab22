"""Accuracy recovery: activation-aware starts, layer-wise refinement, structure choice
and hidden-unit permutation search, all on second moments of layer inputs (captured
by ``lyoncompress.capture``)."""

from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.gram import Whitening, gram, output_energy, output_error, sqrt_factor
from lyoncompress.refine.layerwise import RefineResult, least_squares_error, refine_layer
from lyoncompress.refine.permutation import apply_permutation, search_permutation
from lyoncompress.refine.structure import (
    CANDIDATES,
    Structure,
    StructureChoice,
    choose_structure,
    hybrid_start,
)

__all__ = [
    "CANDIDATES",
    "RefineResult",
    "Structure",
    "StructureChoice",
    "Whitening",
    "activation_aware_lowrank",
    "activation_aware_projection",
    "apply_permutation",
    "choose_structure",
    "gram",
    "hybrid_start",
    "least_squares_error",
    "output_energy",
    "output_error",
    "refine_layer",
    "search_permutation",
    "sqrt_factor",
]
