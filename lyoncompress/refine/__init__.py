"""Accuracy recovery: activation-aware starts, layer-wise refinement and hidden-unit
permutation search, all on second moments of layer inputs (captured by
``lyoncompress.capture``; the structure choice that uses them is in
``lyoncompress.structures``)."""

from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.gram import Whitening, gram, output_energy, output_error, sqrt_factor
from lyoncompress.refine.layerwise import RefineResult, least_squares_error, refine_layer
from lyoncompress.refine.permutation import apply_permutation, search_permutation

__all__ = [
    "RefineResult",
    "Whitening",
    "activation_aware_lowrank",
    "activation_aware_projection",
    "apply_permutation",
    "gram",
    "least_squares_error",
    "output_energy",
    "output_error",
    "refine_layer",
    "search_permutation",
    "sqrt_factor",
]
