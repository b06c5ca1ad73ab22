"""``quantize --calib``: the inputs each ``ButterflyLinear`` of a factorized artifact sees.

The factorized model (not the reference) is run on the calibration data, because its
quantized layers will see the inputs of the factorized layers before them. Whole
batches go either to the fitting rows or to the held-out second moment (every
``val_every``-th batch), as in ``refine.capture_inputs``: rows of one sentence are
correlated, so splitting inside a batch would leak.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.errors import InputError
from lyoncompress.factorization.calibrated import calibration_batches
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed
from lyoncompress.refine.calibration import input_rows


@dataclass(frozen=True)
class QuantCalibration:
    """``train``: input rows ``(rows, n)`` to fit on; ``gram_val``: held-out ``Xᵀ X`` ``(n, n)``."""

    train: torch.Tensor
    gram_val: torch.Tensor
    rows_val: int


def output_error(exact: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖(W - Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` from ``G = Xᵀ X``: ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))``."""
    diff = exact - approx  # (m, n)
    num = ((diff @ gram) * diff).sum()
    den = ((exact @ gram) * exact).sum().clamp_min(1e-300)
    return float((num / den).clamp_min(0).sqrt())


def capture(
    model: torch.nn.Module,
    names: list[str],
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    max_rows: int,
    val_every: int = 4,
) -> dict[str, QuantCalibration]:
    """Run ``model`` on ``batches``; per ``ButterflyLinear`` in ``names``, up to ``max_rows``
    fitting rows and the Gram of up to ``max_rows`` held-out rows."""
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), ButterflyLinear):
            raise InputError(
                f"{name!r} is not a ButterflyLinear of the factorized model; is the artifact intact?"
            )
    train: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    counts = {name: [0, 0] for name in names}
    grams = {
        name: torch.zeros(modules[name].in_features, modules[name].in_features, dtype=torch.float64)
        for name in names
    }
    state: dict[str, Any] = {"split": 0, "mask": None}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = input_rows(inputs[0].detach(), state["mask"])  # padding left out
            split = state["split"]
            rows = rows[: max_rows - counts[name][split]].cpu()
            counts[name][split] += rows.shape[0]
            if split == 0:
                train[name].append(rows)
            else:
                grams[name] += rows.T @ rows

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                state["split"] = 1 if index % val_every == val_every - 1 else 0
                state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                model(**batch) if isinstance(batch, Mapping) else model(batch)
                if all(min(c) >= max_rows for c in counts.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in names:
        if min(counts[name]) == 0:
            missing = "held-out" if counts[name][0] else "fitting"
            raise InputError(
                f"layer {name}: the calibration data gave it no {missing} rows; "
                f"--calib needs at least {val_every} batches"
            )
        out[name] = QuantCalibration(torch.cat(train[name]), grams[name], counts[name][1])
    return out


def calibrate(
    artifact: Path, names: list[str], calib: str, samples: int, tokenizer: Path | None
) -> dict[str, QuantCalibration]:
    """Inputs of the layers ``names`` of the factorized ``artifact`` on ``calib`` (a data
    file as ``eval --data`` takes, or ``builtin``); text is tokenized with the tokenizer
    in ``tokenizer`` (default: the artifact folder)."""
    config = load_artifact(artifact).config
    model = load_compressed(artifact)
    batches = calibration_batches(tokenizer or artifact, config, calib, samples)
    try:
        return capture(model, names, batches, samples)
    except (OSError, ValueError, RuntimeError) as err:
        # the tokenizer loads lazily with the first batch (OSError), and data of the wrong
        # width fails in the model's first matmul (RuntimeError): both are bad --calib input
        raise InputError(
            f"--calib {calib}: the factorized model could not run on it ({err}); check the data's "
            "feature count, or pass --reference with the folder that holds the tokenizer for text"
        ) from err
