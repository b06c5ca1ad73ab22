"""Second moments of calibration inputs and the output error they measure.

For a linear layer ``y = x W^T`` and inputs ``X`` (samples × n), the output error
of an approximation ``B`` is ``‖X W^T - X B^T‖_F² = tr(E G E^T)`` with ``E = W - B``
and ``G = X^T X``. Everything here works from ``G`` alone, so a cost never grows
with the number of calibration samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lyoncompress.errors import InputError


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for inputs ``x`` of shape ``(..., n)`` (leading dims are samples)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (samples, n)
    return rows.T @ rows


def check_gram(gram: torch.Tensor, n: int, name: str = "gram") -> None:
    """Refuse a second moment that does not fit a layer with ``n`` input features."""
    if tuple(gram.shape) != (n, n):
        raise InputError(
            f"{name} has shape {tuple(gram.shape)}; the layer takes {n} inputs, so use ({n}, {n})"
        )
    if not all_finite(gram):
        raise InputError(f"{name} contains NaN/Inf values; recapture the calibration inputs")


def all_finite(tensor: torch.Tensor, rows: int = 256) -> bool:
    """``torch.isfinite(tensor).all()``, a slab of ``rows`` leading indices at a time:
    ``isfinite`` of a float tensor makes a float copy (``abs``) and two masks, ~1.3x the
    tensor (334 MiB beside a 5632-wide float64 moment, at a fit's peak)."""
    parts = tensor.split(rows) if tensor.ndim else (tensor,)
    return all(bool(torch.isfinite(part).all()) for part in parts)


def sqrt_factor(gram: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = G + δ I``, ``δ = damping · mean(diag G)``.

    The damping keeps ``L`` invertible when the calibration inputs do not span every
    direction (fewer samples than features, dead units), and stops an
    activation-aware fit from trusting directions it has barely seen.

    ``L`` is computed in the memory of the damped copy: one ``(n, n)`` float64 instead
    of two (254 MiB at ``n = 5632``), the numbers of ``torch.linalg.cholesky`` bit for
    bit (the same LAPACK call on the same column-major matrix).
    """
    factor = _damped(gram, damping)  # (n, n) float64, symmetric
    # a symmetric row-major matrix read transposed is its column-major copy, which is
    # what LAPACK factorises in place: afterwards the memory holds L column-major
    torch.linalg.cholesky(factor.mT, out=factor.mT)
    return _transpose_in_place(factor)  # row-major L, as torch.linalg.cholesky returns it


def _transpose_in_place(square: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """``square`` (n, n) overwritten by its transpose, a ``tile x tile`` block at a time
    (exact: values are moved, not computed); returns it."""
    n = square.shape[0]
    for i in range(0, n, tile):
        diagonal = square[i : i + tile, i : i + tile]
        diagonal.copy_(diagonal.T.clone())
        for j in range(i + tile, n, tile):
            upper, lower = square[i : i + tile, j : j + tile], square[j : j + tile, i : i + tile]
            kept = upper.clone()
            upper.copy_(lower.T)
            lower.copy_(kept.T)
    return square


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """A float64 copy of ``G + δ I``, ``δ = damping · mean(diag G)``. The ridge is added
    to the copy's diagonal in place: the same numbers as ``G + δ · I``, without two more
    ``(n, n)`` float64 temporaries (38 MiB at ``n = 1536``, a streamed run's peak)."""
    damped = gram.to(torch.float64, copy=True)
    diagonal = damped.diagonal()
    diagonal += damping * float(diagonal.mean().clamp_min(1e-300))
    return damped


@dataclass(frozen=True)
class Whitening:
    """``L`` lower triangular with ``L L^T = G + δI`` (see ``sqrt_factor``), and that damped
    ``G``: computed once per layer and shared by every refinement of it, since the
    Cholesky factor and the product cost ``n³`` each (a tenth of a second at ``n = 1536``).
    The damped ``G`` is made on first use: a fit without refinement (activation-aware low
    rank) never reads it, and it is one more ``(n, n)`` float64 at the fit's peak."""

    chol: torch.Tensor  # (n, n) float64

    @functools.cached_property
    def gram(self) -> torch.Tensor:
        """``chol @ chol.T``, ``(n, n)`` float64."""
        return self.chol @ self.chol.T

    @classmethod
    def of(cls, gram: torch.Tensor, damping: float = 1e-4) -> Whitening:
        return cls(sqrt_factor(gram, damping))


def output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖X W^T‖_F²`` from ``G = X^T X``: the denominator of ``output_error``."""
    w = weight.to(torch.float64)
    # the product scaled in place: the same numbers as ((w @ G) * w), one (m, n) float64 less
    return float((w @ gram.to(torch.float64)).mul_(w).sum())


def output_error(
    weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, energy: float | None = None
) -> float:
    """Relative output error ``‖X (W - B)^T‖_F / ‖X W^T‖_F`` from ``G = X^T X``.

    Bias terms cancel in the difference, so the layer's bias plays no part. ``energy``
    is ``output_energy(weight, gram)`` when the caller judges many approximations of
    one weight (it halves the cost of each call).
    """
    g = gram.to(torch.float64)
    # W - B and (E G) * E made in place: the numbers of the out-of-place expressions
    # (float32 -> float64 is exact), two (m, n) float64 temporaries less
    e = weight.to(torch.float64, copy=True).sub_(approx)  # (m, n)
    num = (e @ g).mul_(e).sum().clamp_min(0.0)
    den = max(output_energy(weight, g) if energy is None else energy, 1e-300)
    return float((num / den).sqrt())


def corrected_target(
    weight: torch.Tensor, gram_work: torch.Tensor, cross: torch.Tensor, damping: float = 1e-2
) -> torch.Tensor:
    """The dense weight that best maps the compressed model's inputs ``X~`` to the
    reference outputs ``X W^T``: ``W C (G~ + δ I)^{-1}`` with ``C = X^T X~``, ``G~ = X~^T X~``.

    Since ``‖X W^T - X~ B^T‖² = ‖X~ (W_c - B)^T‖² + const``, fitting ``B`` to this
    target in the metric ``G~`` is fitting it to the reference outputs: the layer also
    corrects what earlier compressed layers got wrong. The ridge ``δ = damping ·
    mean(diag G~)`` keeps the correction from trusting directions seen too rarely.
    """
    # G~ is symmetric: (W C) (G~ + δI)^{-1} = solve((G~ + δI), (W C)^T)^T
    rhs = (weight.to(torch.float64) @ cross.to(torch.float64)).T
    return torch.linalg.solve(_damped(gram_work, damping), rhs).T.to(weight.dtype)


def paired_output_error(
    weight: torch.Tensor,
    approx: torch.Tensor,
    reference_gram: torch.Tensor,
    cross: torch.Tensor,
    gram_work: torch.Tensor,
) -> float:
    """Relative error ``‖X W^T - X~ B^T‖_F / ‖X W^T‖_F`` of a layer ``B`` fed by the
    compressed model's inputs ``X~``, against the reference ``X W^T``, from moments
    ``X^T X``, ``C = X^T X~`` and ``X~^T X~`` alone."""
    w, b = weight.to(torch.float64), approx.to(torch.float64)
    reference = ((w @ reference_gram.to(torch.float64)) * w).sum()
    mixed = ((w @ cross.to(torch.float64)) * b).sum()
    compressed = ((b @ gram_work.to(torch.float64)) * b).sum()
    num = (reference - 2 * mixed + compressed).clamp_min(0.0)
    return float((num / reference.clamp_min(1e-300)).sqrt())
