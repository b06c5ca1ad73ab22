"""Calibration capture: stream the inputs of chosen ``nn.Linear`` layers into second moments.

Forward pre-hooks see each layer's input; its rows (one per token/sample) are
accumulated as ``X^T X`` in float64, so memory is ``n × n`` per layer however
much data flows through. Whole batches go either to the training moment or to
the held-out one (every ``val_every``-th batch): rows of one sentence are
correlated, so splitting inside a batch would leak.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lyoncompress.errors import InputError


@dataclass(frozen=True)
class LayerCalibration:
    """Second moments of one layer's inputs: ``gram_train`` to fit, ``gram_val`` to judge.

    Both are float64 ``(n, n)``; ``rows_train`` / ``rows_val`` count the input rows.
    """

    gram_train: torch.Tensor
    gram_val: torch.Tensor
    rows_train: int
    rows_val: int


class _Accumulator:
    def __init__(self, n: int, max_rows: int) -> None:
        self.grams = [torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)]
        self.rows = [0, 0]
        self.max_rows = max_rows

    def add(self, split: int, rows: torch.Tensor) -> None:
        rows = rows[: self.max_rows - self.rows[split]].to(torch.float64).cpu()  # (k, n)
        self.grams[split] += rows.T @ rows
        self.rows[split] += rows.shape[0]

    @property
    def full(self) -> bool:
        return min(self.rows) >= self.max_rows


def capture_inputs(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    max_samples: int = 8192,
    val_every: int = 4,
) -> dict[str, LayerCalibration]:
    """Run ``model`` on ``batches`` and return the input second moments of ``layer_names``.

    Args:
        model: any module; it is called as ``model(batch)`` or ``model(**batch)``
            for a mapping (e.g. a tokenizer's output). Its train/eval mode is left as is.
        layer_names: names of ``nn.Linear`` submodules (as in ``model.named_modules()``).
        batches: the calibration data. When a batch is a mapping with an
            ``attention_mask`` and a layer's input is ``(batch, seq, n)``, padded
            positions are skipped.
        max_samples: at most this many input rows per layer go into each moment;
            iteration stops once both moments of every layer are full.
        val_every: every ``val_every``-th batch is held out (>= 2).

    Returns:
        ``{name: LayerCalibration}``.

    Example:
        >>> calib = capture_inputs(model, ["encoder.layer.0.intermediate.dense"], batches)
        >>> calib["encoder.layer.0.intermediate.dense"].gram_train.shape
        torch.Size([384, 384])
    """
    if val_every < 2:
        raise InputError(f"val_every={val_every} leaves no batch for training; use 2 or more")
    names = list(layer_names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise InputError(f"{name!r} is not an nn.Linear submodule of the model; check the layer name")
    acc = {name: _Accumulator(modules[name].in_features, max_samples) for name in names}
    current: dict[str, Any] = {"split": 0, "mask": None}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            mask = current["mask"]
            if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask.to(torch.bool)]  # (tokens, n)
            else:
                rows = x.reshape(-1, x.shape[-1])  # (samples, n)
            acc[name].add(current["split"], rows)

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                current["split"] = 1 if index % val_every == val_every - 1 else 0
                if isinstance(batch, Mapping):
                    current["mask"] = batch.get("attention_mask")
                    model(**batch)
                else:
                    current["mask"] = None
                    model(batch)
                if all(a.full for a in acc.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return {name: LayerCalibration(a.grams[0], a.grams[1], a.rows[0], a.rows[1]) for name, a in acc.items()}
