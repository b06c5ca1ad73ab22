"""Accuracy recovery: calibration capture, activation-aware starts, layer-wise
refinement and hidden-unit permutation search (the structure choice that uses them
is in ``lyoncompress.structures``)."""

from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.calibration import LayerCalibration, capture_inputs
from lyoncompress.refine.gram import Whitening, gram, output_energy, output_error, sqrt_factor
from lyoncompress.refine.layerwise import RefineResult, least_squares_error, refine_layer
from lyoncompress.refine.permutation import apply_permutation, search_permutation

__all__ = [
    "LayerCalibration",
    "RefineResult",
    "Whitening",
    "activation_aware_lowrank",
    "activation_aware_projection",
    "apply_permutation",
    "capture_inputs",
    "gram",
    "least_squares_error",
    "output_energy",
    "output_error",
    "refine_layer",
    "search_permutation",
    "sqrt_factor",
]
