"""Second moments of calibration inputs and the output error they measure.

For a linear layer ``y = x W^T`` and inputs ``X`` (samples × n), the output error
of an approximation ``B`` is ``‖X W^T - X B^T‖_F² = tr(E G E^T)`` with ``E = W - B``
and ``G = X^T X``. Everything here works from ``G`` alone, so a cost never grows
with the number of calibration samples.
"""

from __future__ import annotations

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
    if not torch.isfinite(gram).all():
        raise InputError(f"{name} contains NaN/Inf values; recapture the calibration inputs")


def sqrt_factor(gram: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = G + δ I``, ``δ = damping · mean(diag G)``.

    The damping keeps ``L`` invertible when the calibration inputs do not span every
    direction (fewer samples than features, dead units), and stops an
    activation-aware fit from trusting directions it has barely seen.
    """
    g = gram.to(torch.float64)
    scale = float(torch.diagonal(g).mean().clamp_min(1e-300))
    eye = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    return torch.linalg.cholesky(g + damping * scale * eye)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``‖X (W - B)^T‖_F / ‖X W^T‖_F`` from ``G = X^T X``.

    Bias terms cancel in the difference, so the layer's bias plays no part.
    """
    g = gram.to(torch.float64)
    w = weight.to(torch.float64)
    e = w - approx.to(torch.float64)  # (m, n)
    num = ((e @ g) * e).sum().clamp_min(0.0)
    den = ((w @ g) * w).sum().clamp_min(1e-300)
    return float((num / den).sqrt())
