"""Learned rescalings: tune the diagonals (and scales) by gradient descent through rounding.

Start from an analytic solution ``T_ℓ`` (twiddles to round). The parameters are one
log-diagonal ``δ_ℓ`` per pair of neighbours, applied as ``diag(e^{-δ_{ℓ-1}}) T_ℓ
diag(e^{δ_ℓ})`` (function-preserving before rounding), and for scaled formats the
log of every scale. Rounding is a straight-through estimator: values pass their
gradient unchanged, scales get ``code - value/scale`` (as in LSQ). The loss is the
relative output error on calibration inputs; the held-out part decides which
iterate is returned, starting with the analytic one, so the result is never worse
than the start on held-out data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lyoncompress.quantization.diagonal import Job, Rescaled, scale_cols, scale_rows


@dataclass(frozen=True)
class LearnSettings:
    steps: int = 60
    lr: float = 0.01
    eval_every: int = 10
    holdout: float = 0.25  # fraction of calibration rows kept for selection
    probes: int = 128  # Gaussian inputs used when no calibration data is given
    seed: int = 0


def learn(
    job: Job, original: Sequence[torch.Tensor], start: Rescaled, settings: LearnSettings = LearnSettings()
) -> Rescaled:
    """Improve ``start`` (an analytic rescaling of ``original``) on ``job.calib``."""
    train, held = _split(job, settings)
    with torch.no_grad():
        target_train = job.chain.apply(list(original), train)  # (B, m)
        target_held = job.chain.apply(list(original), held)
    base = [t.detach() for t in start.twiddles]
    pats = job.chain.patterns
    deltas = [torch.zeros(p.a * p.c * p.d, dtype=torch.float64, requires_grad=True) for p in pats[:-1]]
    scales0 = [s if s is not None else job.fmt.scales(t, job.group_size) for t, s in zip(base, start.scales)]
    log_scales = [
        None if s is None else s.double().clamp_min(1e-30).log().requires_grad_(True) for s in scales0
    ]
    params = deltas + [s for s in log_scales if s is not None]

    def twiddles() -> list[torch.Tensor]:
        out = []
        for i, (p, t) in enumerate(zip(pats, base)):
            if i < len(deltas):
                t = scale_cols(p, t, deltas[i].exp())
            if i > 0:
                t = scale_rows(p, t, (-deltas[i - 1]).exp())
            out.append(t)
        return out

    def held_error(found: Rescaled) -> float:
        """Error of exactly what would be stored: the format's own rounding, float32 scales."""
        with torch.no_grad():
            rounded = [job.fmt.fake(t, job.group_size, s) for t, s in zip(found.twiddles, found.scales)]
            return _relative(job.chain.apply(rounded, held), target_held)

    def current() -> Rescaled:
        with torch.no_grad():
            return Rescaled(
                tuple(t.detach().clone() for t in twiddles()),
                tuple(None if s is None else s.detach().exp().float() for s in log_scales),
            )

    best, best_error = start, held_error(start)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad()
        rounded = [_ste(job, t, s) for t, s in zip(twiddles(), log_scales)]
        loss = _relative_t(job.chain.apply(rounded, train), target_train)
        loss.backward()
        optimizer.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            found = current()
            error = held_error(found)
            if error < best_error:
                best_error, best = error, found
    return best


def _ste(job: Job, value: torch.Tensor, log_scale: torch.Tensor | None) -> torch.Tensor:
    """Rounded ``value`` whose gradient is the identity (and LSQ's for the scale)."""
    if log_scale is None:
        return value + (job.fmt.fake(value.detach(), job.group_size, None) - value).detach()
    scale = log_scale.exp()
    codes = job.fmt.fake(value.detach(), job.group_size, scale.detach().float())
    wide = _expand(scale, job.group_size)  # broadcastable to value
    unit = value / wide
    return (unit + (codes / wide.detach() - unit).detach()) * wide


def _expand(scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Scales ``(a, d, b, c // G)`` (or per row / per tensor) broadcast to ``(a, d, b, c)``."""
    if group_size is None:
        return scale
    return scale.repeat_interleave(group_size, dim=-1)


def _split(job: Job, settings: LearnSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out inputs ``(B, n)``; Gaussian probes when there is no calibration set."""
    n = job.chain.shape[1]
    if job.calib is None:
        gen = torch.Generator().manual_seed(settings.seed)
        probes = torch.randn(2 * settings.probes, n, generator=gen, dtype=torch.float64)
        return probes[: settings.probes], probes[settings.probes :]
    calib = job.calib.double().reshape(-1, n)
    cut = max(1, int(round(calib.shape[0] * (1 - settings.holdout))))
    held = calib[cut:] if cut < calib.shape[0] else calib
    return calib[:cut], held


def _relative_t(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum() / (target**2).sum().clamp_min(1e-300)


def _relative(out: torch.Tensor, target: torch.Tensor) -> float:
    return float(_relative_t(out, target))
