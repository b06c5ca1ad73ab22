"""Differentiable fake quantization of a twiddle for quantization-aware distillation.

The forward pass is exactly the integer grid of ``formats.IntFormat``:
``ŵ = s · clamp(round(w / s), -Q, Q)`` per group of entries sharing a scale ``s``.
The backward pass is LSQ's (Esser et al., *Learned Step Size Quantization*, 2020):

- the rounding is a straight-through estimator, ``∂round(v)/∂v = 1``, so
  ``∂ŵ/∂w = 1`` inside the grid (``|w/s| ≤ Q``) and 0 where the clamp saturates;
- ``∂ŵ/∂s = round(v) - v`` inside and ``±Q`` outside (``v = w / s``), and the scale's
  gradient is multiplied by ``g = 1 / sqrt(n · Q)`` with ``n`` the entries that share
  the scale, so that a scale sees updates of the size its weights see.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lyoncompress.errors import InputError
from lyoncompress.quantization.formats import IntFormat, get_format

# a scale never reaches 0 (an all-zero group's scale is 0): its entries then round to
# ±Q · MIN_SCALE, i.e. stay at zero, as the format's own all-zero groups do
MIN_SCALE = 1e-30


class _GradScaled(torch.autograd.Function):
    """``x`` in the forward pass (bit for bit), gradient multiplied by ``g`` in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def _grad_scaled(x: torch.Tensor, g: float) -> torch.Tensor:
    return _GradScaled.apply(x, g)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, the identity's gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def lsq_fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, top: float, group_size: int | None
) -> torch.Tensor:
    """``s · clamp(round(w / s), -top, top)`` with LSQ gradients for ``w`` and ``scale``.

    Args:
        w: a twiddle ``(a, d, b, c)``.
        scale: ``(a, d, b, 1)`` (one per block row) or ``(a, d, b, c // G)`` (groups of
            ``group_size`` entries along ``c``), as ``IntFormat`` stores it.
        top: the largest code ``Q`` (7 for int4, 127 for int8).
        group_size: ``G``, or None for one scale per block row.

    Returns:
        The fake-quantized twiddle, of ``w``'s shape.
    """
    c = w.shape[-1]
    per_scale = c if group_size is None else group_size
    if c % per_scale or tuple(scale.shape) != (*w.shape[:-1], c // per_scale):
        raise InputError(
            f"scale of shape {tuple(scale.shape)} does not fit a twiddle of shape {tuple(w.shape)} "
            f"with group size {group_size}"
        )
    s = _grad_scaled(scale.clamp_min(MIN_SCALE), 1.0 / math.sqrt(per_scale * top)).unsqueeze(-1)
    grouped = w.reshape(*w.shape[:-1], c // per_scale, per_scale)  # (a, d, b, groups, G)
    codes = _round_ste((grouped / s).clamp(-top, top))
    return (codes * s).reshape(w.shape)


class FakeQuantized(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``) that fake-quantizes a weight.

    It holds the learned ``scale`` as a parameter; the weight it is registered on
    becomes the latent float tensor. ``shape`` is the twiddle shape ``(a, d, b, c)``
    the format groups over: a plain ``nn.Linear`` weight ``(m, n)`` is the one-factor
    twiddle ``(1, 1, m, n)``, as ``quantize`` stores it.

    Example:
        >>> fq = FakeQuantized("int4", scale, group_size=64, shape=(1, 1, 1536, 384))
        >>> parametrize.register_parametrization(linear, "weight", fq)
    """

    def __init__(self, fmt: str, scale: torch.Tensor, group_size: int | None, shape: tuple[int, ...]) -> None:
        super().__init__()
        fmt_ = get_format(fmt)
        if not isinstance(fmt_, IntFormat):
            raise InputError(
                f"quantization-aware distillation trains the scales of int8 / int4; format {fmt} has none "
                "of them: pick --format int8 or int4, or drop --distill-steps"
            )
        self.top = fmt_.top
        self.group_size = group_size
        self.shape = tuple(shape)
        self.scale = nn.Parameter(scale.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        twiddle = lsq_fake_quantize(w.reshape(self.shape), self.scale.to(w.dtype), self.top, self.group_size)
        return twiddle.reshape(w.shape)

    def stored_scale(self) -> torch.Tensor:
        """The float32 scale to store: the learned one, kept positive as the forward pass uses it."""
        return self.scale.detach().clamp_min(MIN_SCALE).float()
