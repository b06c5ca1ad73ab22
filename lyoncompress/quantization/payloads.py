"""Quantized payloads back to float twiddles: what loading a quantized artifact needs.

The runtime (``layers``, ``evaluation``) reads quantized artifacts through this module
only, so that it never imports the ``quantize`` verb (``quantization.pipeline``).
"""

from __future__ import annotations

from typing import Any

import torch

from lyoncompress.butterfly import Chain, lowrank
from lyoncompress.errors import InputError
from lyoncompress.quantization.formats import get_format


def layer_chains(entry: dict[str, Any]) -> dict[str, Chain]:
    """The chains of a layer-table entry by group: ``factors`` (and ``lowrank``)."""
    chains = {"factors": Chain.of(*entry["chain"])}
    if entry["lowrank_rank"]:
        chains["lowrank"] = lowrank(entry["out_features"], entry["in_features"], entry["lowrank_rank"])
    return chains


def dequantize_state(
    state: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's payload tensors by float twiddles (``…twiddle``)."""
    state = dict(state)
    for name, entry in layers.items():
        record = entry.get("quantization")
        if not record:
            continue
        fmt = get_format(record["format"])
        dtype = getattr(torch, entry["dtype"])
        for group, chain in layer_chains(entry).items():
            for index, pattern in enumerate(chain.patterns):
                prefix = f"{name}.{group}.{index}."
                payload = {k.removeprefix(prefix): state.pop(k) for k in list(state) if k.startswith(prefix)}
                if not payload:
                    raise InputError(f"quantized layer {name}: no payload tensors {prefix}*")
                state[f"{prefix}twiddle"] = fmt.dequantize(payload, pattern.twiddle_shape, dtype)
    return state
