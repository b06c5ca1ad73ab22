"""The ``inspect`` verb: what an artifact holds, layer by layer, as one document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import load_artifact


def inspect_artifact(artifact: str | Path) -> dict[str, Any]:
    """Each compressed layer of ``artifact``: structure, chain, parameters, error and bits.

    Args:
        artifact: folder written by ``factorize`` or ``quantize``.

    Returns:
        ``{"artifact": str, "layers": [{name, structure, chain, params_before,
        params_after, compression, rel_error, bits}], "totals": {params_before,
        params_after}}``; values the report does not hold are None.

    Example:
        >>> inspect_artifact("fact/")["layers"][0]["structure"]
        'monarch'
    """
    art = load_artifact(artifact)
    rows = {row["name"]: row for row in art.report.get("layers", [])}
    layers = []
    for name, entry in art.layers.items():
        row = rows.get(name, {})
        dense = entry["in_features"] * entry["out_features"]
        params = row.get("params_after")
        quant = entry.get("quantization") or {}
        layers.append(
            {
                "name": name,
                "structure": entry["structure"],
                "chain": " ".join("({},{},{},{})".format(*p) for p in entry["chain"]),
                "params_before": dense,
                "params_after": params,
                "compression": round(dense / params, 2) if params else None,
                "rel_error": row.get("rel_error"),
                "bits": quant.get("bits_per_weight", 8 * getattr(torch, entry["dtype"]).itemsize),
            }
        )
    before = sum(layer["params_before"] for layer in layers)
    after = sum(layer["params_after"] or 0 for layer in layers)
    return {
        "artifact": str(artifact),
        "layers": layers,
        "totals": {"params_before": before, "params_after": after},
    }
