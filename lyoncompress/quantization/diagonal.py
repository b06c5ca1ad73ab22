"""The diagonal freedom between two KS factors: views of their columns and rows, and scalings.

Between ``X_ℓ`` (pattern ``(a,b,c,d)``) and ``X_{ℓ+1}`` the shared index ``j`` is
column ``(i, l, k) ∈ a×c×d`` of ``X_ℓ`` and row ``(i', j', k') ∈ a'×b'×d'`` of
``X_{ℓ+1}``, both flattened row-major (``a·c·d = a'·b'·d'``). Weights say what an entry's rounding
error costs once the factors before it multiply it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain, KSPattern
from lyoncompress.quantization.formats import QuantFormat


@dataclass(frozen=True)
class Rescaled:
    """Twiddles to hand to the format, and per factor the scale to use (None: the format's own)."""

    twiddles: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class Job:
    """Everything a rescaling may look at."""

    chain: Chain
    fmt: QuantFormat
    group_size: int | None
    calib: torch.Tensor | None  # (B, n) inputs of the layer, or None
    # (n, n) Gram of held-out inputs: what ``auto`` judges by, so that a rescaling fitted
    # to ``calib`` is not also judged on it
    held_out_gram: torch.Tensor | None = None


def cols(pattern: KSPattern, twiddle: torch.Tensor) -> torch.Tensor:
    """Columns of the factor on their support: twiddle ``(..., a, d, b, c)`` -> ``(..., a·c·d, b)``."""
    a, b, c, d = pattern.as_tuple()
    return twiddle.movedim(-1, -3).reshape(*twiddle.shape[:-4], a * c * d, b)  # (..., a, c, d, b)


def rows(pattern: KSPattern, twiddle: torch.Tensor) -> torch.Tensor:
    """Rows of the factor on their support: twiddle ``(..., a, d, b, c)`` -> ``(..., a·b·d, c)``."""
    a, b, c, d = pattern.as_tuple()
    return twiddle.movedim(-2, -3).reshape(*twiddle.shape[:-4], a * b * d, c)  # (..., a, b, d, c)


def scale_cols(pattern: KSPattern, twiddle: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``X diag(s)`` for ``s (a·c·d,)``."""
    a, b, c, d = pattern.as_tuple()
    return twiddle * s.reshape(a, c, d).permute(0, 2, 1).unsqueeze(2)  # (a, d, 1, c)


def scale_rows(pattern: KSPattern, twiddle: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``diag(s) X`` for ``s (a·b·d,)``."""
    a, b, c, d = pattern.as_tuple()
    return twiddle * s.reshape(a, b, d).permute(0, 2, 1).unsqueeze(-1)  # (a, d, b, 1)


def rescale_pair(
    job: Job, twiddles: list[torch.Tensor], left: int, lam: torch.Tensor, mu: torch.Tensor
) -> None:
    """Scale column j of factor ``left`` by ``lam_j`` and row j of the next factor by ``mu_j``."""
    pats = job.chain.patterns
    twiddles[left] = scale_cols(pats[left], twiddles[left], lam)
    twiddles[left + 1] = scale_rows(pats[left + 1], twiddles[left + 1], mu)


def entry_weights(pattern: KSPattern, row_weight: torch.Tensor) -> torch.Tensor:
    """Weight of every entry of every column, ``(a·c·d, b)``, from one weight per row ``(a·b·d,)``."""
    a, b, c, d = pattern.as_tuple()
    per_row = row_weight.reshape(a, b, d).permute(0, 2, 1).unsqueeze(-1)  # (a, d, b, 1)
    return cols(pattern, per_row.expand(a, d, b, c))


def prefix_weights(pattern: KSPattern, quantized: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """Squared column norms ``(a·c·d,)`` of ``P X̂`` from those of ``P`` (``row_weight``
    ``(a·b·d,)``, one per row of ``X̂``).

    Exact when the columns of ``P`` over each column's support are orthogonal, which
    holds for chains where each entry of the product is one path of twiddle entries
    (square butterflies, Monarch); elsewhere the cross terms are left out. Normalised
    to mean 1: the search only compares costs of one column, so a common factor is free.
    """
    a, b, c, d = pattern.as_tuple()
    per_row = row_weight.reshape(a, b, d).permute(0, 2, 1)  # (a, d, b)
    out = torch.einsum("adbc,adb->acd", quantized * quantized, per_row).reshape(-1)  # (a·c·d,)
    return out / out.mean().clamp_min(torch.finfo(out.dtype).tiny)
