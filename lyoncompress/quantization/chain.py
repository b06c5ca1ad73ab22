"""``quantize_chain``: rescale then round every factor of a chain; the result and its size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain
from lyoncompress.errors import InputError
from lyoncompress.quantization.diagonal import Job
from lyoncompress.quantization.formats import Payload, get_format
from lyoncompress.quantization.rescale import rescale as rescale_fn
from lyoncompress.quantization.rescale import resolve

SCALE_BITS = 32  # scales are stored as float32


@dataclass(frozen=True)
class QuantizedChain:
    """Quantized factors of ``chain``: one payload per factor (see ``formats``).

    ``rescale`` and ``group_size`` are what produced the payloads; they are not
    needed to read them back.
    """

    chain: Chain
    format: str
    rescale: str
    group_size: int | None
    payloads: tuple[Payload, ...]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Twiddles ``(a, d, b, c)`` of the quantized factors, in ``dtype``."""
        fmt = get_format(self.format)
        return [
            fmt.dequantize(payload, pattern.twiddle_shape, dtype)
            for payload, pattern in zip(self.payloads, self.chain.patterns)
        ]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per non-zero, float32 scales included (``float:tN`` counts ``N``)."""
        fmt = get_format(self.format)
        scales = sum(p["scale"].numel() for p in self.payloads if "scale" in p)
        return (fmt.bits * self.chain.params + SCALE_BITS * scales) / self.chain.params


def quantize_chain(
    chain: Chain,
    twiddles: Sequence[torch.Tensor],
    fmt: str,
    rescale: str = "left-to-right",
    group_size: int | None = None,
    calib: torch.Tensor | None = None,
    held_out_gram: torch.Tensor | None = None,
) -> QuantizedChain:
    """Quantize the factors of ``W = X_1 … X_L`` to ``fmt``, using the diagonal freedom
    ``X_ℓ X_{ℓ+1} = (X_ℓ D)(D⁻¹ X_{ℓ+1})`` to lower the error of the product.

    Args:
        chain: the patterns of the factors.
        twiddles: one ``(a, d, b, c)`` tensor per factor (any float dtype).
        fmt: a name from ``FORMATS`` (``float:t4``, ``fp8-e4m3``, ``int8``, ``int4`` …).
        rescale: a name from ``RESCALINGS`` (``none``, ``optimal``, ``pairwise``,
            ``left-to-right``, ``learned``), optionally after ``equalize+``;
            ``equalize`` alone equalises ranges and rounds.
        group_size: scales per group of this many entries along ``c`` (must divide
            ``c``); None: per tensor for fp8, per row of block for int8/int4.
            Formats without scales refuse it.
        calib: inputs ``(B, n)`` of the layer, used by ``learned`` (Gaussian
            probes when None).
        held_out_gram: ``Xᵀ X`` ``(n, n)`` of held-out inputs of the layer; ``auto``
            then keeps the candidate with the lower error on them.

    Returns:
        ``QuantizedChain`` with one payload per factor.

    Example:
        >>> chain = square_butterfly(64)
        >>> twiddles = [torch.randn(p.twiddle_shape) for p in chain.patterns]
        >>> q = quantize_chain(chain, twiddles, "float:t4")
        >>> q.bits_per_weight, len(q.dequantized())
        (4.0, 6)
    """
    format_ = get_format(fmt)
    resolve(rescale)
    chain.check_twiddles(twiddles)
    for i, t in enumerate(twiddles):
        if not torch.isfinite(t).all():
            raise InputError(f"twiddle {i} of chain {chain} contains NaN/Inf; nothing sensible to quantize")
    if calib is not None and calib.shape[-1] != chain.shape[1]:
        raise InputError(
            f"calibration inputs have {calib.shape[-1]} features but the chain takes {chain.shape[1]}"
        )
    if held_out_gram is not None and tuple(held_out_gram.shape) != (chain.shape[1],) * 2:
        raise InputError(
            f"held_out_gram has shape {tuple(held_out_gram.shape)}; the chain takes {chain.shape[1]} inputs"
        )
    job = Job(chain=chain, fmt=format_, group_size=group_size, calib=calib, held_out_gram=held_out_gram)
    found = rescale_fn(job, [t.detach().double() for t in twiddles], rescale)
    payloads = tuple(format_.quantize(t, group_size, s) for t, s in zip(found.twiddles, found.scales))
    return QuantizedChain(chain=chain, format=fmt, rescale=rescale, group_size=group_size, payloads=payloads)
