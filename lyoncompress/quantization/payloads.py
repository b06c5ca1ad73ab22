"""Quantized payloads back to float twiddles: what loading a quantized artifact needs.

The runtime (``layers``, ``evaluation``) reads quantized artifacts through this module
only, so that it never imports the ``quantize`` verb (``quantization.pipeline``).
"""

from __future__ import annotations

import torch

from lyoncompress.errors import FormatError, InputError
from lyoncompress.quantization.formats import get_format
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
