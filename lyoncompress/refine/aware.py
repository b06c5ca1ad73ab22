"""Activation-aware low rank: the best rank-``k`` approximation in the output metric.

Plain truncated SVD minimises ``‖W - W_k‖_F``; a layer only ever sees its inputs,
so what matters is ``‖(W - W_k) L‖_F`` with ``L L^T = G = X^T X``. Since ``W_k L``
ranges over all rank-``k`` matrices when ``L`` is invertible, the optimum is the
truncated SVD of ``W L`` mapped back: ``W_k = (W L)_k L^{-1}`` (Eckart–Young in the
whitened space). Plain SVD is ``project(W, lowrank(m, n, rank))``.
"""

from __future__ import annotations

import torch

from lyoncompress.errors import InputError
from lyoncompress.factorize import check_matrix
from lyoncompress.refine.gram import check_gram, sqrt_factor


def activation_aware_lowrank(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 1e-4
) -> list[torch.Tensor]:
    """Twiddles ``U (1, 1, m, r)`` and ``V (1, 1, r, n)`` of the chain ``lowrank(m, n, r)``
    minimising the output error ``‖X (W - U V)^T‖_F`` on inputs with ``X^T X = gram``.

    Args:
        weight: the ``(m, n)`` weight of an ``nn.Linear`` (out × in).
        gram: ``(n, n)`` second moment of the layer's inputs (see ``capture_inputs``).
        rank: ``1 <= rank <= min(m, n)``.
        damping: added to ``gram`` as ``damping · mean(diag gram) · I`` before the
            Cholesky factorisation (see ``sqrt_factor``).

    Returns:
        ``[U, V]`` in ``weight``'s dtype, with the singular values split evenly
        (``U = P √S``, ``V = √S Q^T L^{-1}``) so both factors have the same scale.

    Example:
        >>> x = torch.randn(256, 8, dtype=torch.float64)
        >>> u, v = activation_aware_lowrank(torch.randn(6, 8, dtype=torch.float64), gram(x), 2)
        >>> u.shape, v.shape
        (torch.Size([1, 1, 6, 2]), torch.Size([1, 1, 2, 8]))
    """
    check_matrix(weight, "weight")
    m, n = weight.shape
    check_gram(gram, n)
    if not 1 <= rank <= min(m, n):
        raise InputError(f"rank {rank} must be between 1 and min(m, n) = {min(m, n)} for a {m}x{n} weight")
    chol = sqrt_factor(gram, damping)  # (n, n) lower triangular
    p, s, qh = torch.linalg.svd(weight.to(torch.float64) @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root  # (m, r)
    # V = √S Q^T L^{-1}  <=>  L^T V^T = Q √S, an upper-triangular solve
    v = torch.linalg.solve_triangular(chol.T, qh[:rank].T * root, upper=True).T  # (r, n)
    return [u.reshape(1, 1, m, rank).to(weight.dtype), v.reshape(1, 1, rank, n).to(weight.dtype)]
