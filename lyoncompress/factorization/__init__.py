"""Factorization: projection onto KS chains, weight-space and calibrated factorization.

The structures and their fits are registered in ``lyoncompress.structures``. The
``factorize`` verb is in ``lyoncompress.factorization.pipeline`` (re-exported by the
top-level package); importing it here would make ``layers`` depend on the pipeline.
"""

from lyoncompress.factorization.projection import ORDERS, Projection, check_matrix, project

__all__ = ["ORDERS", "Projection", "check_matrix", "project"]
