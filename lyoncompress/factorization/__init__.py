"""Factorization: projection onto KS chains and the method registry.

The ``factorize`` verb is in ``lyoncompress.factorization.pipeline`` (re-exported by the
top-level package); importing it here would make ``layers`` depend on the pipeline.
"""

from lyoncompress.factorization.methods import METHODS, LayerFactors, get_method
from lyoncompress.factorization.projection import ORDERS, Projection, check_matrix, project

__all__ = ["METHODS", "ORDERS", "LayerFactors", "Projection", "check_matrix", "get_method", "project"]
