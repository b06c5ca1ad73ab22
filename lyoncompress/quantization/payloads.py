"""Quantized payloads back to float twiddles: what loading a quantized artifact needs.

The runtime (``layers``, ``evaluation``) reads quantized artifacts through this module
only, so that it never imports the ``quantize`` verb (``quantization.pipeline``).

``dequantize_payload`` is the runtime's fast twin of ``QuantFormat.dequantize``: it
works in the target dtype instead of float64 (codes and float32 scales are exact in
float32 and their product has at most 48 significant bits, so a float32 or float64
result is bit-identical to the format's), which is what a ``QuantizedButterflyLinear``
runs on every forward pass.

int4 codes are held in memory in one of two nibble orders (``NIBBLE_ORDERS``): ``pairs``,
the artifact's (``formats.pack_int4``: codes ``(i, 2k)`` and ``(i, 2k+1)`` share byte
``(i, k)``, shape ``(a, d, b, ceil(c/2))``), or ``rows`` (codes ``(i, k)`` and
``(i + ceil(b/2), k)`` share byte ``(i, k)``, shape ``(a, d, ceil(b/2), c)``), which a layer
repacks to at load: it unpacks in two passes that each write one contiguous block of
rows (the nibble moved to the top of a byte is ``16 * code``; the ``1/16`` goes into the
scale, exactly, as a power of two). Both hold ``b * c / 2`` bytes, give or take a row or
column of padding.
"""

from __future__ import annotations

import math
import threading

import torch

from lyoncompress.errors import FormatError, InputError
from lyoncompress.quantization.formats import Payload, get_format, pack_int4, unpack_int4
from lyoncompress.schema import LayerRecord

NIBBLE_ORDERS = ("pairs", "rows")  # int4 codes in memory: the artifact's order, or rows


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


def dequantize_payload(
    payload: Payload, shape: tuple[int, ...], dtype: torch.dtype, nibbles: str = "pairs"
) -> torch.Tensor:
    """The float twiddle of ``shape`` that a payload stores, computed in ``dtype``.

    The payload's fields say its layout (``quantization.formats``): ``values`` (a cast
    or rounded float, no scale), or ``qdata`` (int8, fp8, or uint8 holding two int4
    codes per byte in the order ``nibbles``, see the module docstring) times ``scale`` of
    shape ``()`` (per tensor), ``(a, d, b, 1)`` (per row of block) or ``(a, d, b, c // G)``
    (groups of ``G`` along c).

    Example:
        >>> twiddle = dequantize_payload({"qdata": codes, "scale": scale}, (1, 1, 64, 32), torch.float32)
    """
    if "values" in payload:
        return payload["values"].reshape(shape).to(dtype)
    codes, scale = payload["qdata"], payload["scale"]
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # a fresh float tensor of the codes, scaled in place (one pass fewer than a promoting multiply)
    values, unit = _codes(codes, shape, work, nibbles)
    values = values.reshape(shape) if values.shape != shape else values
    scale = scale.to(work) * unit if unit != 1 else scale.to(work)
    if scale.ndim == 0 or scale.shape[-1] == 1:  # per tensor, or per row of block: broadcasts
        return values.mul_(scale).to(dtype)
    groups = scale.shape[-1]
    grouped = values.contiguous().view(*shape[:-1], groups, shape[-1] // groups)  # (a, d, b, c // G, G)
    return grouped.mul_(scale.unsqueeze(-1)).view(shape).to(dtype)


def codes_and_row_scale(
    payload: Payload,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nibbles: str = "pairs",
    scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """A dense factor's payload (``shape`` ``(1, 1, b, c)``) as codes ``(b, c)`` in
    ``dtype``, the scale of each of its ``b`` output rows (``()`` per tensor, None without
    a scale) and the unit the codes are counted in, so that
    ``x @ W.T == (x @ codes.T) * scale * unit``: the scale then multiplies the ``b``
    outputs instead of the ``b * c`` weights. The unit is 1, or ``1/16`` for int4 codes
    held as ``rows`` (which unpack to ``16 * code``); a power of two, so the products
    are the same bit for bit wherever it is applied. None when the scale varies along a
    row (groups): only ``dequantize_payload`` applies then.

    ``scratch``: unpack int4 codes into this thread's reusable buffer (no allocation),
    valid until the next call; only for a result used at once and not kept by autograd.

    Example:
        >>> codes, scale, unit = codes_and_row_scale(payload, (1, 1, 1536, 153), torch.float32)
        >>> y = F.linear(x, codes) * scale * unit
    """
    if "values" in payload:
        return payload["values"].reshape(shape[-2:]).to(dtype), None, 1.0
    codes, scale = payload["qdata"], payload["scale"]
    if scale.ndim and scale.shape[-1] != 1:
        return None
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    values, unit = _codes(codes, shape, work, nibbles, scratch)
    values = values.reshape(shape[-2:]).to(dtype)
    scale = scale.to(dtype)
    return values, scale.reshape(-1) if scale.ndim else scale, unit


def int4_rows(packed: torch.Tensor, c: int) -> torch.Tensor:
    """int4 codes from the ``pairs`` nibble order (the artifact's, ``(..., b, ceil(c/2))``)
    to ``rows`` (``(..., ceil(b/2), c)``): byte ``(i, k)`` holds codes ``(i, k)`` (low
    nibble) and ``(i + ceil(b/2), k)`` (high nibble; zero padding for an odd ``b``)."""
    codes = unpack_int4(packed, c).to(torch.int16)  # (..., b, c)
    b = codes.shape[-2]
    top = (b + 1) // 2
    if b % 2:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, 1))  # a zero row
    return ((codes[..., :top, :] & 0xF) | ((codes[..., top:, :] & 0xF) << 4)).to(torch.uint8)


def int4_pairs(packed: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of ``int4_rows``: ``(..., ceil(b/2), c)`` back to the artifact's order."""
    signed = packed.view(torch.int8)
    codes = torch.cat(((signed << 4) >> 4, signed >> 4), dim=-2)[..., :b, :]  # (..., b, c)
    return pack_int4(codes)


def _codes(
    codes: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, nibbles: str, scratch: bool = False
) -> tuple[torch.Tensor, float]:
    """The stored codes of a twiddle of ``shape`` as floats and the unit they are counted in."""
    if codes.dtype != torch.uint8:
        return codes.to(dtype), 1.0
    if nibbles == "pairs":
        return _unpack_int4(codes, shape[-1], dtype), 1.0
    if nibbles != "rows":
        raise ValueError(f"nibble order {nibbles!r} is not one of {', '.join(NIBBLE_ORDERS)}")
    top = codes.shape[-2]
    full = (*codes.shape[:-2], 2 * top, codes.shape[-1])
    out = (
        _scratch(full, dtype, codes.device)
        if scratch
        else torch.empty(full, dtype=dtype, device=codes.device)
    )
    signed = codes.view(torch.int8)
    # each pass reads the bytes once and writes one contiguous block of rows, computed in
    # int8 and stored as float: the low nibble shifted up and the high nibble masked are
    # both 16 * their code, exactly
    torch.bitwise_left_shift(signed, 4, out=out[..., :top, :])
    torch.bitwise_and(signed, -16, out=out[..., top:, :])
    return out[..., : shape[-2], :], 1.0 / 16


_scratch_pool = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer of ``shape`` for this thread (grown, never shrunk)."""
    pool = _scratch_pool.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = pool.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffer = pool[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def _unpack_int4(packed: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``(..., ceil(c/2))`` -> codes ``(..., c)`` in ``dtype`` (``formats.unpack_int4``'s
    layout); for an odd ``c`` a view that skips the padding code."""
    signed = packed.view(torch.int8)
    out = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)  # (..., ceil(c/2), 2)
    out[..., 0] = (signed << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    out[..., 1] = signed >> 4
    return out.flatten(-2)[..., :c]
