"""Global budget allocation: layers that hurt the final output more keep more parameters.

A uniform budget gives every layer the same fraction of its parameters, although
layers differ twice: in how fast their own output error falls with parameters, and
in how much of that error reaches the model's final output. Both are measured:

* the error curve ``e_i(r)²`` of the activation-aware rank-``r`` approximation comes
  free from the singular values of ``W_i L_i`` (``L_i L_i^T = G_i``): the tail sum;
* the sensitivity ``s_i = E_i / e_i``: the final-output relative error ``E_i`` with only
  layer ``i`` replaced (at the uniform budget), per unit of its own output error.

To first order the final squared error is ``Σ_i s_i² e_i(r_i)²``; it is separable and
convex in each ``r_i`` (sorted singular values), so a greedy that always buys the rank
with the largest decrease per parameter is optimal for every budget it passes through.
Ranks of different layers cost different amounts, so at the very end it can miss the
exact (knapsack) optimum by at most one rank of one layer.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lyoncompress.errors import InputError
from lyoncompress.refine.gram import sqrt_factor

Batch = torch.Tensor | Mapping[str, Any]


def lowrank_error_curve(weight: torch.Tensor, gram: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Relative squared output error of the best rank-``r`` fit, for ``r = 0 … min(m, n)``.

    Returns a float64 tensor ``curve`` with ``curve[0] = 1`` and ``curve[min(m, n)] = 0``.
    """
    chol = sqrt_factor(gram, damping)
    energy = torch.linalg.svdvals(weight.to(torch.float64) @ chol).square()  # descending
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{j >= r} σ_j²
    return torch.cat([tail, tail.new_zeros(1)]) / tail[0].clamp_min(1e-300)


def final_outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's last hidden states (real tokens only) or, for a plain module, its output."""
    if isinstance(batch, Mapping):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        mask = batch.get("attention_mask")
        return hidden[mask.to(torch.bool)] if mask is not None else hidden.reshape(-1, hidden.shape[-1])
    return model(batch)


def measure_sensitivity(
    model: nn.Module,
    replacements: Mapping[str, tuple[torch.Tensor, float]],
    batches: Sequence[Batch],
) -> dict[str, float]:
    """Final-output error per unit of layer output error, one layer replaced at a time.

    Args:
        model: the dense reference model; each layer's weight is swapped in place and
            restored (also on error).
        replacements: ``{layer name: (approximate weight, its relative output error)}``.
        batches: held-out calibration batches.

    Returns:
        ``{name: E_i / e_i}``; a layer whose replacement is exact gets sensitivity 1.
    """
    with torch.inference_mode():
        targets = [final_outputs(model, b) for b in batches]
        scale = sum(float(t.square().sum()) for t in targets)
        sensitivity = {}
        for name, (approx, layer_error) in replacements.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise InputError(f"{name!r} is not an nn.Linear of the model")
            original = linear.weight.data
            linear.weight.data = approx.to(original.dtype)
            try:
                outputs = (final_outputs(model, b) for b in batches)
                num = sum(float((out - t).square().sum()) for out, t in zip(outputs, targets))
            finally:
                linear.weight.data = original
            final_error = math.sqrt(num / max(scale, 1e-300))
            sensitivity[name] = final_error / layer_error if layer_error > 0 else 1.0
    return sensitivity


def allocate_ranks(
    curves: Mapping[str, torch.Tensor],
    sensitivity: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    max_params: int,
    min_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks ``r_i`` minimising ``Σ_i s_i² curve_i[r_i]`` with ``Σ_i r_i (m_i + n_i) <= max_params``,
    greedily (at least as good as the exact optimum for ``max_params`` minus one rank's cost).

    Args:
        curves: ``lowrank_error_curve`` of each layer.
        sensitivity: ``s_i`` of each layer (``measure_sensitivity``).
        shapes: ``(m_i, n_i)``.
        max_params: the global parameter budget.
        min_ranks: a floor per layer (default 1), so no layer is dropped entirely.

    Returns:
        ``{name: rank}``; a layer never gets more parameters than its dense weight.
    """
    ranks = {name: (min_ranks or {}).get(name, 1) for name in curves}
    used = sum(ranks[k] * sum(shapes[k]) for k in curves)
    if used > max_params:
        raise InputError(
            f"the parameter budget {max_params:,} does not cover rank 1 for every layer ({used:,}); "
            "raise the budget"
        )

    def gain(name: str) -> float | None:
        m, n = shapes[name]
        rank = ranks[name]
        if (rank + 1) * (m + n) > m * n or rank + 1 >= len(curves[name]):
            return None  # more rank would cost more than the dense weight
        drop = float(curves[name][rank] - curves[name][rank + 1])
        return sensitivity[name] ** 2 * drop / (m + n)

    heap = [(-g, name) for name in curves if (g := gain(name)) is not None]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        cost = sum(shapes[name])
        if used + cost > max_params:
            continue  # a cheaper layer may still fit
        ranks[name] += 1
        used += cost
        if (g := gain(name)) is not None:
            heapq.heappush(heap, (-g, name))
    return ranks
