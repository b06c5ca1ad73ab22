"""Calibration capture: stream the inputs of chosen ``nn.Linear`` layers into second moments.

Forward pre-hooks see each layer's input; its rows (one per token/sample) are
accumulated as ``X^T X`` in float64, so memory is ``n × n`` per layer however
much data flows through. Whole batches go either to the training moment or to
the held-out one (every ``val_every``-th batch): rows of one sentence are
correlated, so splitting inside a batch would leak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lyoncompress.errors import InputError


@dataclass(frozen=True)
class LayerCalibration:
    """Second moments of one layer's inputs: ``gram_train`` to fit, ``gram_val`` to judge.

    All are float64 ``(n, n)``; ``rows_train`` / ``rows_val`` count the input rows.
    Sequential calibration (``capture_paired``) sees the layer's inputs ``X~`` in a
    partly compressed model while its targets stay ``X W^T`` of the reference
    inputs ``X``: the grams are then ``X~^T X~``, ``cross_*`` hold ``X^T X~``, and
    ``reference_gram_val`` is ``X^T X`` of the held-out rows (None otherwise).
    """

    gram_train: torch.Tensor
    gram_val: torch.Tensor
    rows_train: int
    rows_val: int
    cross_train: torch.Tensor | None = None
    cross_val: torch.Tensor | None = None
    reference_gram_val: torch.Tensor | None = None

    @property
    def sequential(self) -> bool:
        return self.cross_train is not None


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
            acc[name].add(current["split"], input_rows(inputs[0].detach(), current["mask"]))

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


class _Reached(Exception):
    """Raised by a hook once the watched layer has seen its input: nothing after it
    is needed, so the rest of the forward pass is skipped."""


def _run(model: nn.Module, batch: torch.Tensor | Mapping[str, Any]) -> None:
    with contextlib.suppress(_Reached):
        model(**batch) if isinstance(batch, Mapping) else model(batch)


def input_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input ``x`` as one float64 row per real token or sample, ``(rows, n)``:
    positions that ``mask`` (a tokenizer's attention mask) marks as padding are left out."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)].to(torch.float64)
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def forward_order(
    model: nn.Module, layer_names: Iterable[str], batch: torch.Tensor | Mapping[str, Any]
) -> list[str]:
    """``layer_names`` in the order the forward pass first reaches them (layers it never
    reaches keep their given order, at the end)."""
    names = list(layer_names)
    modules = dict(model.named_modules())
    seen: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if name not in seen:
                seen.append(name)

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen + [name for name in names if name not in seen]


def capture_paired(
    reference: nn.Module,
    working: nn.Module,
    layer_name: str,
    batches: Sequence[torch.Tensor | Mapping[str, Any]],
    max_samples: int = 8192,
    val_every: int = 4,
) -> LayerCalibration:
    """Second and cross moments of one layer's inputs in ``reference`` (``X``) and in
    ``working`` (``X~``, the same model with earlier layers already compressed).

    Both models see the same batches, so their rows pair up token by token. Each
    forward pass stops at the layer. Batches are split as in ``capture_inputs``.

    Returns:
        ``LayerCalibration`` with ``gram_* = X~^T X~``, ``cross_* = X^T X~`` and
        ``reference_gram_val = X^T X`` (held-out rows).
    """
    if val_every < 2:
        raise InputError(f"val_every={val_every} leaves no batch for training; use 2 or more")
    modules = [dict(model.named_modules()).get(layer_name) for model in (reference, working)]
    if not all(isinstance(m, nn.Module) for m in modules):
        raise InputError(f"{layer_name!r} is not a submodule of both models; check the layer name")
    captured: list[torch.Tensor] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach())
        raise _Reached

    n = modules[0].in_features

    def zeros() -> torch.Tensor:
        return torch.zeros(n, n, dtype=torch.float64)

    grams, crosses, rows = [zeros(), zeros()], [zeros(), zeros()], [0, 0]
    reference_val = zeros()
    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                split = 1 if index % val_every == val_every - 1 else 0
                if rows[split] >= max_samples:
                    if min(rows) >= max_samples:
                        break
                    continue
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                captured.clear()
                _run(reference, batch)
                _run(working, batch)
                if len(captured) != 2:
                    raise InputError(f"the calibration data never reached {layer_name!r}; check --calib")
                x, x_work = (input_rows(t, mask)[: max_samples - rows[split]] for t in captured)
                grams[split] += x_work.T @ x_work
                crosses[split] += x.T @ x_work
                if split == 1:
                    reference_val += x.T @ x
                rows[split] += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return LayerCalibration(grams[0], grams[1], rows[0], rows[1], crosses[0], crosses[1], reference_val)
