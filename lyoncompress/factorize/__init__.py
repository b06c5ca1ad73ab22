"""Factorization: projection onto KS chains, the method registry, and the ``factorize`` verb."""

from lyoncompress.factorize.methods import METHODS, LayerFactors, get_method
from lyoncompress.factorize.pipeline import factorize
from lyoncompress.factorize.projection import ORDERS, Projection, check_matrix, project

__all__ = [
    "METHODS",
    "ORDERS",
    "LayerFactors",
    "Projection",
    "check_matrix",
    "factorize",
    "get_method",
    "project",
]
