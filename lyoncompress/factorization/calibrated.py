"""Data-aware factorization: capture calibration activations, then pick and refine each
layer's structure by held-out *output* error instead of weight error.

``--calib builtin`` uses the offline defaults (the digits training split for the demo
MLP; standard-library docstring sentences, the ``calib`` half, for text models);
any other value is a data file in the formats ``eval --data`` takes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lyoncompress.checkpoint import Checkpoint
from lyoncompress.errors import InputError
from lyoncompress.evaluation.data import (
    builtin_corpus,
    digits_split,
    load_samples,
    load_tokenizer,
    regrouped_by_length,
    tokenized_batches,
)
from lyoncompress.factorization.methods import Candidate, LayerFactors, prepared_weight
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import DEMO_MODEL_TYPE, load_compressed, load_reference
from lyoncompress.plan import LayerPlan
from lyoncompress.recipe import Recipe
from lyoncompress.refine import LayerCalibration, activation_aware_lowrank, capture_inputs
from lyoncompress.refine.allocation import allocate_ranks, lowrank_error_curve, measure_sensitivity
from lyoncompress.refine.calibration import capture_paired, forward_order
from lyoncompress.refine.distill import DistillResult, distill
from lyoncompress.refine.gram import corrected_target, output_error, paired_output_error
from lyoncompress.structures import calibrated_candidates, choose_structure, rank_for_budget

BUILTIN = "builtin"
VAL_EVERY = 4  # every 4th calibration batch is held out
ALLOCATION_BATCHES = 8  # held-out batches that measure each layer's sensitivity
# held-out batches that judge distillation (each is run through both models at every
# check); the later ones train too: the built-in text has ~760 batches, not 58
DISTILL_VAL_BATCHES = 16
TEXT_BATCH = 16
TENSOR_BATCH = 64


def calibration_batches(
    checkpoint: str | Path, config: dict[str, Any], calib: str, samples: int
) -> Iterator[Any]:
    """The calibration data as model inputs: tensors, or tokenizer outputs for text.

    A generator: the built-in text yields the 928-sentence first part of the ``calib``
    split (58 batches) before it builds the rest (~11k sentences, 5-11 s once per
    process), so consumers that stop early, such as a capture bounded by ``samples``
    rows, never pay for the rest.
    """
    is_mlp = config.get("model_type") == DEMO_MODEL_TYPE
    if calib == BUILTIN and is_mlp:
        yield from digits_split().x_train.float().split(TENSOR_BATCH)
        return
    if calib == BUILTIN:
        texts: Iterator[list[str]] = _builtin_text()
    else:
        data = load_samples(calib)
        if data.texts is None:
            yield from data.inputs.float().split(TENSOR_BATCH)
            return
        texts = iter([data.texts])
    folder = Path(checkpoint)
    tokenizer = load_tokenizer(folder if folder.is_dir() else folder.parent)
    for part in texts:
        yield from tokenized_batches(tokenizer, part, TEXT_BATCH)


def _builtin_text() -> Iterator[list[str]]:
    """The built-in ``calib`` split in two parts, the second only built when asked for.
    The first part's 928 sentences fill whole batches of 16, so the batches are the
    same as those of the split in one piece."""
    first = builtin_corpus(None, split="calib", extended=False)
    yield first
    yield builtin_corpus(None, split="calib")[len(first) :]


def _capture_batches(checkpoint: str | Path, config: dict[str, Any], calib: str, samples: int) -> list[Any]:
    """What layer-wise capture runs on: for the built-in text only its first part,
    whose 58 batches fill the default 4096 rows of both moments; the rest of it is for
    distillation, which reads every batch."""
    batches = calibration_batches(checkpoint, config, calib, samples)
    if calib == BUILTIN and config.get("model_type") != DEMO_MODEL_TYPE:
        first = builtin_corpus(None, split="calib", extended=False)
        return list(itertools.islice(batches, math.ceil(len(first) / TEXT_BATCH)))
    return list(batches)


def calibrated_layer(
    weight: torch.Tensor, layer: LayerPlan, calibration: LayerCalibration, steps: int, sweeps: int
) -> LayerFactors:
    """The structure with the lowest held-out output error within the layer's budget.

    With sequential calibration the structure is fitted to ``corrected_target`` in the
    metric of the compressed model's inputs, and ``reference_error`` reports the
    held-out error against the reference model's outputs.
    """
    _check_reached(layer.name, calibration)
    target = (
        corrected_target(weight, calibration.gram_train, calibration.cross_train)
        if calibration.sequential
        else weight
    )
    choice = choose_structure(
        target,
        calibration.gram_train,
        calibration.gram_val,
        layer.budget,
        candidates=calibrated_candidates(layer.method),
        steps=steps,
        sweeps=sweeps,
        depth=layer.depth,
    )
    best = choice.chosen
    approx = best.chain.to_dense(best.twiddles)
    if best.lowrank_twiddles:
        approx = approx + best.lowrank_twiddles[0][0, 0] @ best.lowrank_twiddles[1][0, 0]
    weight_error = float((weight - approx).norm() / weight.norm().clamp_min(1e-30))
    candidates = [Candidate(s.name, str(s.chain), s.params, s.val_error) for s in choice.candidates]
    reference_error = (
        paired_output_error(
            weight, approx, calibration.reference_gram_val, calibration.cross_val, calibration.gram_val
        )
        if calibration.sequential
        else None
    )
    return LayerFactors(
        structure=best.structure,
        chain=best.chain,
        twiddles=best.twiddles,
        rel_error=weight_error,
        candidates=candidates,
        lowrank_twiddles=best.lowrank_twiddles,
        output_error=best.val_error,
        reference_error=reference_error,
        fit=best.name,
    )


def calibrated_factors(
    checkpoint: str | Path,
    source: Checkpoint,
    layers: list[LayerPlan],
    recipe: Recipe,
    progress: Callable[[str, int, int], None] | None = None,
) -> CalibratedFactors:
    """Factors of every planned layer, fitted on calibration data.

    Captures the reference model's layer inputs once; with ``recipe.allocate ==
    "sensitivity"`` re-divides the layers' total budget by measured sensitivity;
    with ``recipe.sequential`` fits the layers in forward order, each on the inputs
    of the model whose earlier layers are already compressed.
    """
    model = load_reference(source)  # through ``source``: permuted MLPs stay permuted
    batches = _capture_batches(checkpoint, source.config or {}, recipe.calib, recipe.calib_samples)
    names = [layer.name for layer in layers]
    calibration: dict[str, LayerCalibration] = {}
    if not recipe.sequential or recipe.allocate == "sensitivity":
        calibration = capture_inputs(model, names, batches, max_samples=recipe.calib_samples)
        for name, layer_calibration in calibration.items():
            _check_reached(name, layer_calibration)
    sensitivity: dict[str, float] | None = None
    if recipe.allocate == "sensitivity":
        layers, sensitivity = _allocate(
            model, source, layers, calibration, batches[VAL_EVERY - 1 :: VAL_EVERY]
        )
    by_name = {layer.name: layer for layer in layers}
    order = forward_order(model, names, batches[0]) if recipe.sequential else names
    working = copy.deepcopy(model) if recipe.sequential else None
    factors: dict[str, LayerFactors] = {}
    seconds: dict[str, float] = {}
    for name in order:
        begin = time.perf_counter()
        layer = by_name[name]
        weight = _weight(source, layer)
        if working is not None:
            layer_calibration = capture_paired(model, working, name, batches, recipe.calib_samples, VAL_EVERY)
        else:
            layer_calibration = calibration[name]
        factors[name] = calibrated_layer(
            weight, layer, layer_calibration, recipe.refine_steps, recipe.refine_sweeps
        )
        if working is not None:
            _swap(working, name, factors[name])
        seconds[name] = time.perf_counter() - begin
        if progress is not None:
            progress(name, len(factors), len(order))
    return CalibratedFactors(factors, {layer.name: layer.budget for layer in layers}, sensitivity, seconds)


@dataclass(frozen=True)
class CalibratedFactors:
    """Every layer's factors, the budget each layer got, when allocated by
    sensitivity each layer's measured sensitivity, and the seconds each layer took
    (its paired capture included when sequential)."""

    factors: dict[str, LayerFactors]
    budgets: dict[str, float]
    sensitivity: dict[str, float] | None
    seconds: dict[str, float]


def _check_reached(name: str, calibration: LayerCalibration) -> None:
    if calibration.rows_train == 0 or calibration.rows_val == 0:
        raise InputError(f"layer {name}: the calibration data never reached it; check --calib")


def _weight(source: Checkpoint, layer: LayerPlan) -> torch.Tensor:
    return prepared_weight(source.load(layer.weight_name), layer.weight_name)


def _swap(model: torch.nn.Module, name: str, factors: LayerFactors) -> None:
    """Put a layer's factors into ``model`` in place of its ``nn.Linear``."""
    linear = model.get_submodule(name)
    dtype = linear.weight.dtype
    layer = ButterflyLinear.from_twiddles(
        factors.chain,
        [t.to(dtype) for t in factors.twiddles],
        None if linear.bias is None else linear.bias.detach(),
        [t.to(dtype) for t in factors.lowrank_twiddles] or None,
    )
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _allocate(
    model: torch.nn.Module,
    source: Checkpoint,
    layers: list[LayerPlan],
    calibration: dict[str, LayerCalibration],
    held_out: list[Any],
) -> tuple[list[LayerPlan], dict[str, float]]:
    """Re-divide the layers' total parameter budget by measured sensitivity.

    Each layer is probed with its activation-aware SVD at its planned budget; the
    ranks ``allocate_ranks`` buys become each layer's budget fraction.
    """
    curves, shapes, replacements, floors = {}, {}, {}, {}
    for layer in layers:
        weight = _weight(source, layer).to(torch.float64)
        m, n = weight.shape
        gram = calibration[layer.name].gram_train
        rank = max(1, rank_for_budget(m, n, layer.budget))
        u, v = activation_aware_lowrank(weight, gram, rank)
        approx = u[0, 0] @ v[0, 0]
        curves[layer.name] = lowrank_error_curve(weight, gram)
        shapes[layer.name] = (m, n)
        replacements[layer.name] = (approx, output_error(weight, approx, calibration[layer.name].gram_val))
        floors[layer.name] = max(1, rank // 4)  # no layer is starved below a quarter of its share
    sensitivity = measure_sensitivity(model, replacements, held_out[:ALLOCATION_BATCHES])
    total = sum(int(layer.budget * math.prod(shapes[layer.name])) for layer in layers)
    ranks = allocate_ranks(curves, sensitivity, shapes, total, floors)
    allocated = [
        dataclasses.replace(
            layer,
            budget=min(1.0, ranks[layer.name] * sum(shapes[layer.name]) / math.prod(shapes[layer.name])),
        )
        for layer in layers
    ]
    return allocated, sensitivity


def distill_artifact(
    checkpoint: str | Path,
    artifact: Path,
    config: dict[str, Any] | None,
    calib: str,
    samples: int,
    steps: int,
    lr: float | None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], DistillResult]:
    """Distil the factors of a staged ``artifact`` against the reference model;
    ``progress`` gets (description, steps done, steps) after each step.

    Returns the distilled twiddles by artifact tensor name, and the held-out errors.
    Every 4th calibration batch is held out, as in layer-wise calibration, up to
    ``DISTILL_VAL_BATCHES`` of them; every other batch trains, text regrouped by
    length (``regrouped_by_length``) so that steps do not compute on padding.
    """
    batches = list(calibration_batches(checkpoint, config or {}, calib, samples))
    held_out = range(VAL_EVERY - 1, len(batches), VAL_EVERY)[:DISTILL_VAL_BATCHES]
    val = [batches[i] for i in held_out]
    train = [b for i, b in enumerate(batches) if i not in held_out]
    if not train or not val:
        raise InputError("--distill-steps needs at least 4 calibration batches; give more --calib data")
    if isinstance(train[0], Mapping):
        train = regrouped_by_length(train, TEXT_BATCH)
    compressed = load_compressed(artifact)
    report_step = None
    if progress is not None:

        def report_step(done: int, total: int, best: float) -> None:
            progress(f"distilling, best held-out error {best:.4f}", done, total)

    result = distill(load_reference(checkpoint), compressed, train, val, steps, lr, progress=report_step)
    twiddles = {name: t.detach() for name, t in compressed.state_dict().items() if name.endswith(".twiddle")}
    return twiddles, result
