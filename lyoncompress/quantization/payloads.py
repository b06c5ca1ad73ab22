"""Quantized payloads back to float twiddles: what loading a quantized artifact needs.

The runtime (``layers``, ``evaluation``) reads quantized artifacts through this module
only, so that it never imports the ``quantize`` verb (``quantization.pipeline``).

``dequantize_payload`` is the runtime's fast twin of ``QuantFormat.dequantize``: it
works in the target dtype instead of float64 (codes and float32 scales are exact in
float32 and their product has at most 48 significant bits, so a float32 or float64
result is bit-identical to the format's), which is what a ``QuantizedButterflyLinear``
runs on every forward pass.
"""

from __future__ import annotations

import torch

from lyoncompress.errors import FormatError, InputError
from lyoncompress.quantization.formats import Payload, get_format
from lyoncompress.schema import LayerRecord


def dequantize_state(
    state: dict[str, torch.Tensor], layers: dict[str, LayerRecord]
) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's payload tensors by float twiddles (``…twiddle``) of the
    record's ``dtype``; an embedding's payload becomes its table ``P.weight``."""
    state = dict(state)
    for name, record in layers.items():
        if record.quantization is None:
            continue
        fmt = get_format(record.quantization.format)
        for group, chain in record.chains.items():
            for index, pattern in enumerate(chain.patterns):
                prefix = f"{name}.{group}.{index}."
                payload = {k.removeprefix(prefix): state.pop(k) for k in list(state) if k.startswith(prefix)}
                if not payload:
                    raise InputError(f"quantized layer {name}: no payload tensors {prefix}*")
                twiddle = fmt.dequantize(payload, pattern.twiddle_shape, record.dtype.torch)
                if record.is_embedding:
                    # the table itself: (1, 1, V, D) -> the nn.Embedding's (V, D) weight
                    state[f"{name}.weight"] = twiddle.reshape(record.out_features, record.in_features)
                else:
                    state[f"{prefix}twiddle"] = twiddle
    return state


def check_finite(state: dict[str, torch.Tensor], layers: dict[str, LayerRecord], source: str) -> None:
    """Every (dequantized) twiddle of every layer is finite: a NaN would poison every output."""
    for name, record in layers.items():
        keys = ["weight"] if record.is_embedding else [f"{key}.twiddle" for key in record.factor_shapes]
        for key in keys:
            tensor = f"{name}.{key}"
            if tensor in state and not bool(torch.isfinite(state[tensor]).all()):
                raise FormatError("holds NaN or infinite values", f"tensor {tensor}", name, source)


def dequantize_payload(payload: Payload, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The float twiddle of ``shape`` that a payload stores, computed in ``dtype``.

    The payload's fields say its layout (``quantization.formats``): ``values`` (a cast
    or rounded float, no scale), or ``qdata`` (int8, fp8, or uint8 holding two int4
    codes per byte, low nibble first) times ``scale`` of shape ``()`` (per tensor),
    ``(a, d, b, 1)`` (per row of block) or ``(a, d, b, c // G)`` (groups of ``G`` along c).

    Example:
        >>> twiddle = dequantize_payload({"qdata": codes, "scale": scale}, (1, 1, 64, 32), torch.float32)
    """
    if "values" in payload:
        return payload["values"].reshape(shape).to(dtype)
    codes, scale = payload["qdata"], payload["scale"]
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # a fresh float tensor of the codes, scaled in place (one pass fewer than a promoting multiply)
    values = _unpack_int4(codes, shape[-1], work) if codes.dtype == torch.uint8 else codes.to(work)
    values = values.reshape(shape) if values.shape != shape else values
    scale = scale.to(work)
    if scale.ndim == 0 or scale.shape[-1] == 1:  # per tensor, or per row of block: broadcasts
        return values.mul_(scale).to(dtype)
    groups = scale.shape[-1]
    grouped = values.contiguous().view(*shape[:-1], groups, shape[-1] // groups)  # (a, d, b, c // G, G)
    return grouped.mul_(scale.unsqueeze(-1)).view(shape).to(dtype)


def codes_and_row_scale(
    payload: Payload, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A dense factor's payload (``shape`` ``(1, 1, b, c)``) as its unscaled codes ``(b, c)``
    in ``dtype`` and the scale of each of its ``b`` output rows (``()`` per tensor, None
    without a scale), so that ``x @ W.T == (x @ codes.T) * scale``: the scale then
    multiplies the ``b`` outputs instead of the ``b * c`` weights. None when the scale
    varies along a row (groups): only ``dequantize_payload`` applies then.

    Example:
        >>> codes, scale = codes_and_row_scale(payload, (1, 1, 1536, 153), torch.float32)
        >>> y = F.linear(x, codes) * scale
    """
    if "values" in payload:
        return payload["values"].reshape(shape[-2:]).to(dtype), None
    codes, scale = payload["qdata"], payload["scale"]
    if scale.ndim and scale.shape[-1] != 1:
        return None
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    values = _unpack_int4(codes, shape[-1], work) if codes.dtype == torch.uint8 else codes.to(work)
    values = values.reshape(shape[-2:]).to(dtype)
    return values, scale.to(dtype).reshape(-1) if scale.ndim else scale.to(dtype)


def _unpack_int4(packed: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``(..., ceil(c/2))`` -> codes ``(..., c)`` in ``dtype`` (``formats.unpack_int4``'s
    layout); for an odd ``c`` a view that skips the padding code."""
    signed = packed.view(torch.int8)
    out = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)  # (..., ceil(c/2), 2)
    out[..., 0] = (signed << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    out[..., 1] = signed >> 4
    return out.flatten(-2)[..., :c]
