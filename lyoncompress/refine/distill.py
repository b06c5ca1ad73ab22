"""End-to-end distillation: train only the butterfly factors so that the compressed
model's outputs match the reference model's, on calibration batches.

Layer-wise refinement fits each layer alone; errors still compound through the
network. Distillation fits the whole stack at once. The loss is the relative squared
error of the final outputs (last hidden states of real tokens, or logits); the best
state on held-out batches is kept, so it never ends worse than it started.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = torch.Tensor | Mapping[str, Any]


@dataclass(frozen=True)
class DistillResult:
    """Held-out relative output error before and after, and the steps taken."""

    val_before: float
    val_after: float
    steps: int


def _outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Final outputs, one row per real token or sample: ``(rows, features)``."""
    if isinstance(batch, Mapping):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        mask = batch.get("attention_mask")
        return hidden[mask.to(torch.bool)] if mask is not None else hidden.reshape(-1, hidden.shape[-1])
    return model(batch)


def _relative_error(model: nn.Module, batches: Sequence[Batch], targets: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        num = sum(float((_outputs(model, b) - t).square().sum()) for b, t in zip(batches, targets))
    den = sum(float(t.square().sum()) for t in targets)
    return math.sqrt(num / max(den, 1e-30))


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The twiddles of every ``ButterflyLinear`` (its factors and low-rank term)."""
    return [p for name, p in model.named_parameters() if name.endswith(".twiddle")]


def distill(
    reference: nn.Module,
    compressed: nn.Module,
    train: Sequence[Batch],
    val: Sequence[Batch],
    steps: int,
    lr: float = 5e-5,
    eval_every: int = 10,
) -> DistillResult:
    """Adam on the twiddles of ``compressed`` (everything else frozen), in place.

    Args:
        reference: the dense model (targets are computed once, without gradients).
        compressed: the model with ``ButterflyLinear`` layers; modified in place.
        train, val: calibration batches to fit and to judge (tensors or tokenizer outputs).
        steps: optimizer steps (one batch each, cycling through ``train``).
        lr: Adam learning rate.
        eval_every: held-out check interval; the best state seen is restored at the end.

    Returns:
        ``DistillResult`` with the held-out relative output error before and after.
    """
    if not train or not val:
        raise ValueError("distillation needs at least one training and one held-out batch")
    with torch.no_grad():
        train_targets = [_outputs(reference, b) for b in train]
        val_targets = [_outputs(reference, b) for b in val]
    params = factor_parameters(compressed)
    frozen = [p for p in compressed.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    best_error = before = _relative_error(compressed, val, val_targets)
    best_state = copy.deepcopy(compressed.state_dict())
    optimizer = torch.optim.Adam(params, lr=lr)
    compressed.train(False)  # no dropout: the targets come from an eval-mode reference
    for step in range(steps):
        batch, target = train[step % len(train)], train_targets[step % len(train)]
        loss = (_outputs(compressed, batch) - target).square().sum() / target.square().sum().clamp_min(1e-30)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            error = _relative_error(compressed, val, val_targets)
            if math.isfinite(error) and error < best_error:
                best_error, best_state = error, copy.deepcopy(compressed.state_dict())
    compressed.load_state_dict(best_state)
    for p in frozen:
        p.requires_grad_(True)
    return DistillResult(before, best_error, steps)
