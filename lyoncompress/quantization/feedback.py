"""Error feedback: quantize factors in data-flow order and let what is left absorb the error.

``W = X_1 … X_L`` acts on inputs ``x`` as ``X_1(X_2(…(X_L x)))``. Let ``Z_ℓ`` hold, one
row per probe input, what factor ``ℓ`` sees: ``Z_{L+1} = inputs`` (the layer's
calibration rows, or the identity when there are none, which makes the objective
the Frobenius product error), ``Z_ℓ = Z_{ℓ+1} X_ℓᵀ``, and ``Ẑ_ℓ`` the same with the
quantized factors. Going from ``X_L`` to ``X_1``:

1. **Least-squares re-fit.** Every row ``r = (i, j, k)`` of ``X_ℓ`` is supported on
   the ``c`` columns ``S = (i, :, k)``, so the best row given the quantized factors
   already fixed is an independent ``c × c`` least-squares problem::

       x'_r = argmin_v ‖Ẑ_S v - Z_S x_r‖²  =  H_S⁻¹ C_S x_r,
       H = Ẑᵀ Ẑ,  C = Ẑᵀ Z  (only the diagonal ``c × c`` blocks are needed).

   It is exact: when ``Ẑ`` spans what ``Z`` does on each block it recovers the
   product to rounding error.
2. **GPTQ within the factor.** The rows are then rounded entry by entry along
   ``c`` (the axis scales are grouped on), each rounding error pushed into the
   row's later entries through the Cholesky factor of ``H_S⁻¹`` (Frantar et al.,
   "GPTQ"), which minimises ``‖(X̂_ℓ - X'_ℓ) Ẑ_{ℓ+1}ᵀ‖`` greedily. For ``X_1`` this is
   the exact objective; for the others the later factors' re-fit takes the rest.
3. **MSE clipping.** Scales of integer/fp8 formats are chosen per group among
   ``absmax·α/top`` for ``α ∈ [clip_min, 1]``, minimising the ``diag(H)``-weighted
   rounding error of the group.

The result is already on the format's grid, with the scales to store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import KSPattern
from lyoncompress.quantization.diagonal import Job, Rescaled, cols, rows, scale_rows
from lyoncompress.quantization.formats import QuantFormat
from lyoncompress.quantization.rankone import solve_rank_one

MAX_EXACT_PROBES = 4096  # identity probes up to this input width, Gaussian ones beyond
GPTQ_BLOCK = 128  # columns rounded one by one before the rest is updated in one matmul


@dataclass(frozen=True)
class FeedbackSettings:
    damp: float = 1e-6  # added to each H block, relative to its mean diagonal
    calib_damp: float = 1e-2  # the same with calibration inputs (GPTQ's default: sampled Grams are noisy)
    clip_min: float = 0.5  # smallest scale shrink tried
    clip_points: int = 11  # shrinks tried in [clip_min, 1]
    seed: int = 0


def probes(job: Job, settings: FeedbackSettings = FeedbackSettings()) -> torch.Tensor:
    """Rows ``(N, n)`` whose Gram weights the objective: calibration inputs, or the identity."""
    n = job.chain.shape[1]
    if job.calib is not None:
        return job.calib.double().reshape(-1, n)
    if n <= MAX_EXACT_PROBES:
        return torch.eye(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(settings.seed)
    return torch.randn(MAX_EXACT_PROBES, n, generator=gen, dtype=torch.float64)


def blocks(pattern: KSPattern, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Diagonal blocks ``u_Sᵀ v_S`` of ``uᵀ v`` for ``u, v (N, a·c·d)`` -> ``(a, d, c, c)``."""
    a, _, c, d = pattern.as_tuple()
    u4, v4 = u.reshape(-1, a, c, d), v.reshape(-1, a, c, d)  # (N, a, c, d)
    return torch.einsum("Nacd,Naed->adce", u4, v4)


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp·mean(diag H)·I`` per block (plus a floor, so all-zero blocks stay solvable)."""
    diag = h.diagonal(dim1=-2, dim2=-1)  # (a, d, c)
    level = damp * diag.mean(-1).clamp_min(1e-300) + 1e-300  # (a, d)
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return h + level[..., None, None] * eye


def refit(twiddle: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Least-squares rows ``x'_r = H_S⁻¹ C_S x_r`` for a twiddle ``(a, d, b, c)``.

    Args:
        twiddle: the factor's current twiddle (the target is ``Z_S x_r``).
        h: ``blocks(p, Ẑ, Ẑ)``, ``(a, d, c, c)``.
        cross: ``blocks(p, Ẑ, Z)``, ``(a, d, c, c)``.
        damp: relative ridge on ``h`` (0: plain least squares, ``h`` must be invertible).

    Returns:
        The re-fitted twiddle ``(a, d, b, c)``.
    """
    rhs = cross @ twiddle.transpose(-1, -2)  # (a, d, c, b): one right-hand side per row
    solved = torch.linalg.solve(_damped(h, damp) if damp > 0 else h, rhs)  # (a, d, c, b)
    return solved.transpose(-1, -2)


def _full_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-tensor ``()``, per-row ``(a,d,b,1)`` or grouped ``(a,d,b,c/G)`` scales -> ``(a,d,b,c)``."""
    if scale.ndim == 0:
        return scale.expand(shape)
    return scale.repeat_interleave(shape[-1] // scale.shape[-1], dim=-1)


def _group_sum(err: torch.Tensor, scale_shape: tuple[int, ...]) -> torch.Tensor:
    """Sum per-entry errors ``(K, a, d, b, c)`` over the entries that share a scale."""
    if not scale_shape:
        return err.flatten(1).sum(-1)  # (K,)
    groups = scale_shape[-1]
    return err.reshape(*err.shape[:-1], groups, -1).sum(-1)  # (K, a, d, b, groups)


def clipped_scales(
    fmt: QuantFormat,
    x: torch.Tensor,
    group_size: int | None,
    weight: torch.Tensor,
    settings: FeedbackSettings,
) -> torch.Tensor | None:
    """The format's scales shrunk per group by the ``α`` with the smallest weighted rounding error.

    ``weight`` broadcasts to ``x`` (``diag(H)`` per column). ``α = 1`` (plain absmax) is
    among the candidates, so the error never exceeds that of the default scales.
    """
    base = fmt.scales(x, group_size)
    if base is None:
        return None
    alphas = torch.linspace(1.0, settings.clip_min, settings.clip_points, dtype=torch.float64)
    tried = torch.stack([(base.double() * alpha).float() for alpha in alphas])  # (K, *scale)
    err = torch.stack([((fmt.fake(x, group_size, s) - x) ** 2) * weight for s in tried])  # (K, a, d, b, c)
    err = _group_sum(err, tuple(base.shape))  # (K, *scale)
    best = err.argmin(0, keepdim=True)  # first minimum: ties keep α = 1
    return tried.gather(0, best)[0]


def _round_entries(fmt: QuantFormat, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Round each entry of ``x`` with its own scale (same shape as ``x``), or scale-free."""
    if scale is None:
        return fmt.fake(x, None, None).reshape(x.shape)
    shaped = x.reshape(1, 1, -1, 1)  # every entry its own group of one
    rounded = fmt.fake(shaped, 1, scale.reshape(1, 1, -1, 1)).reshape(x.shape)
    # a zero scale means an all-zero group on disk: whatever feedback put there reads back as 0
    return torch.where(scale > 0, rounded, torch.zeros_like(rounded))


def gptq(
    fmt: QuantFormat,
    twiddle: torch.Tensor,
    h: torch.Tensor,
    group_size: int | None,
    damp: float,
    settings: FeedbackSettings = FeedbackSettings(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round a twiddle ``(a, d, b, c)`` along ``c`` with GPTQ error feedback under ``h (a, d, c, c)``,
    after choosing clipped scales.

    Returns:
        The rounded twiddle (exactly on the grid of the returned scales) and the scales
        (None for scale-free formats).
    """
    weight = h.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)  # (a, d, 1, c)
    scale = clipped_scales(fmt, twiddle, group_size, weight, settings)
    per_entry = None if scale is None else _full_scale(scale.double(), tuple(twiddle.shape))
    return gptq_rows(fmt, twiddle, h, damp, per_entry), scale


def gptq_rows(
    fmt: QuantFormat, twiddle: torch.Tensor, h: torch.Tensor, damp: float, per_entry: torch.Tensor | None
) -> torch.Tensor:
    """GPTQ along the last axis of ``twiddle (a, d, b, c)``; ``per_entry`` scales of the same shape."""
    w = twiddle.clone()
    # upper Cholesky factor of H⁻¹: row l holds how the error of entry l spreads to entries > l
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, damp)))
    u = torch.linalg.cholesky(h_inv, upper=True)  # (a, d, c, c)
    q = torch.empty_like(w)
    width = w.shape[-1]
    # GPTQ's lazy batches: inside a block of columns the errors spread entry by entry;
    # what they owe the columns after the block is one matmul (the same arithmetic,
    # since those columns are not rounded before the block ends)
    for start in range(0, width, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, width)
        errors = torch.empty(*w.shape[:-1], end - start, dtype=w.dtype)  # (a, d, b, block)
        for col in range(start, end):
            q[..., col] = _round_entries(fmt, w[..., col], None if per_entry is None else per_entry[..., col])
            err = (w[..., col] - q[..., col]) / u[..., col, col].unsqueeze(-1)  # (a, d, b)
            w[..., col + 1 : end] -= err.unsqueeze(-1) * u[:, :, None, col, col + 1 : end]
            errors[..., col - start] = err
        if end < width:
            w[..., end:] -= errors @ u[..., start:end, end:]  # (a, d, b, block) @ (a, d, block, rest)
    return q


def _scan_rows(job: Job, out: list[torch.Tensor], ell: int) -> torch.Tensor:
    """Float grids: scale each row of factor ``ell`` by the ``λ`` whose rounding keeps its direction
    best (exact rank-one scan); the re-fit of factor ``ell - 1`` absorbs ``1/λ``."""
    pats = job.chain.patterns
    x = rows(pats[ell], out[ell])  # (J, c)
    y = cols(pats[ell - 1], out[ell - 1])  # (J, b'): only its norm weighs the direction error
    sol = solve_rank_one(x, y, job.fmt.significand_bits, partner=0.0)
    return scale_rows(pats[ell], out[ell], sol.lam)


def feedback(
    job: Job, twiddles: Sequence[torch.Tensor], settings: FeedbackSettings = FeedbackSettings()
) -> Rescaled:
    """``feedback``: re-fit, clip and GPTQ-round each factor, from the input side (``X_L``) out."""
    pats = job.chain.patterns
    damp = settings.damp if job.calib is None else settings.calib_damp
    z = z_hat = probes(job, settings)  # (N, n): inputs of X_L, exact and quantized
    out: list[torch.Tensor] = list(twiddles)
    scales: list[torch.Tensor | None] = [None] * len(out)
    for ell in reversed(range(len(pats))):
        p = pats[ell]
        h = blocks(p, z_hat, z_hat)  # (a, d, c, c)
        if z_hat is not z:  # X_L sees exact inputs: nothing to re-fit
            out[ell] = refit(twiddles[ell], h, blocks(p, z_hat, z), damp)
        if ell > 0 and job.fmt.significand_bits is not None:
            out[ell] = _scan_rows(job, out, ell)
        out[ell], scales[ell] = gptq(job.fmt, out[ell], h, job.group_size, damp, settings)
        z, z_hat = p.apply(twiddles[ell], z), p.apply(out[ell], z_hat)  # (N, a·b·d)
    return Rescaled(tuple(out), tuple(scales))
