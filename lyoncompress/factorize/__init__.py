"""Factorization methods: dense matrix -> chain twiddles."""

from lyoncompress.factorize.projection import ORDERS, Projection, check_matrix, project

__all__ = ["ORDERS", "Projection", "check_matrix", "project"]
