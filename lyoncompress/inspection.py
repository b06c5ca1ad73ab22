"""The ``inspect`` verb: what an artifact holds, layer by layer, as one document."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.checkpoint import TensorInfo
from lyoncompress.quantization.payloads import check_finite, dequantize_state


def inspect_artifact(artifact: str | Path) -> dict[str, Any]:
    """Each compressed layer of ``artifact``: structure, chain, parameters, error and bits.

    Args:
        artifact: folder written by ``factorize`` or ``quantize``.

    Returns:
        ``{"artifact": str, "layers": [{name, structure, chain, params_before,
        params_after, compression, rel_error, quantization_rel_error, bits, bytes}],
        "totals": {params_before, params_after, layer_bytes, artifact_bytes}}``.
        ``rel_error`` is the weight error against the dense layer (factorized layers);
        ``quantization_rel_error`` the error of the quantized factors against the float
        ones (quantized layers); errors the report does not hold are None.

    Example:
        >>> inspect_artifact("fact/")["layers"][0]["structure"]
        'monarch'
    """
    art = load_artifact(artifact)
    # the headers cannot show a NaN twiddle: read the compressed layers' tensors (small
    # beside the model) so that inspect never prints an invalid artifact as valid
    for name, record in art.layers.items():
        state = {t: art.load(t) for t in art.tensors.names() if t.startswith(f"{name}.")}
        check_finite(dequantize_state(state, {name: record}), {name: record}, str(art.path))
    rows = {row["name"]: row for row in art.report.get("layers", [])}
    infos = art.tensors.infos
    layers = []
    for name, record in art.layers.items():
        row = rows.get(name, {})
        dense = record.in_features * record.out_features
        params = sum(chain.params for chain in record.chains.values())
        quantized = record.quantization is not None
        layers.append(
            {
                "name": name,
                "structure": record.structure.value,
                "chain": " ".join("({},{},{},{})".format(*p) for p in record.chain),
                "params_before": dense,
                "params_after": params,
                "compression": round(dense / params, 2),
                # a quantize report measures its error against the float factors, not the
                # dense weight: shown apart, so a quantized layer never looks better than its source
                "rel_error": None if quantized else row.get("rel_error"),
                "quantization_rel_error": row.get("rel_error") if quantized else None,
                "bits": record.quantization.bits_per_weight
                if quantized
                else 8 * _itemsize(record.dtype.value),
                "bytes": sum(
                    _nbytes(info) for tensor, info in infos.items() if tensor.startswith(f"{name}.")
                ),
            }
        )
    before = sum(layer["params_before"] for layer in layers)
    after = sum(layer["params_after"] for layer in layers)
    return {
        "artifact": str(artifact),
        "layers": layers,
        "totals": {
            "params_before": before,
            "params_after": after,
            "layer_bytes": sum(layer["bytes"] for layer in layers),
            "artifact_bytes": sum(_nbytes(info) for info in infos.values()),
        },
    }


def _itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * info.dtype.itemsize
