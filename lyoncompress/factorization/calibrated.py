"""Data-aware factorization: capture calibration activations, then pick and refine each
layer's structure by held-out *output* error instead of weight error.

``--calib builtin`` uses the offline defaults (the digits training split for the demo
MLP; standard-library docstring sentences, the ``calib`` half, for text models);
any other value is a data file in the formats ``eval --data`` takes.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lyoncompress.capture import LayerCalibration, capture_inputs, capture_paired, forward_order
from lyoncompress.checkpoint import Checkpoint
from lyoncompress.data import (
    BUILTIN,
    TEXT_BATCH,
    VAL_EVERY,
    builtin_corpus,
    calibration_batches,
    distill_split,
    split_batches,
)
from lyoncompress.errors import InputError
from lyoncompress.factorization.journal import FinishedLayer
from lyoncompress.factorization.methods import Candidate, LayerFactors, prepared_weight
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import DEMO_MODEL_TYPE, load_reference
from lyoncompress.plan import LayerPlan
from lyoncompress.recipe import Recipe
from lyoncompress.refine import activation_aware_lowrank
from lyoncompress.refine.allocation import allocate_ranks, lowrank_error_curve, measure_sensitivity
from lyoncompress.refine.distill import DistillResult, distill
from lyoncompress.refine.gram import corrected_target, output_error, paired_output_error
from lyoncompress.structures import Fitted, calibrated_candidates, choose_structure, rank_for_budget

# ``--device``: where capture, structure fits, allocation and distillation run
DEVICE_RESOLVERS: dict[str, Callable[[], torch.device]] = {
    "cpu": lambda: torch.device("cpu"),
    "cuda": lambda: torch.device("cuda"),
    "auto": lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"),
}
ALLOCATION_BATCHES = 8  # held-out batches that measure each layer's sensitivity


def resolve_device(name: str) -> torch.device:
    """The device of ``--device NAME`` (``auto``: cuda if torch sees a GPU, else cpu);
    ``cuda`` without a GPU is an ``InputError``."""
    if name not in DEVICE_RESOLVERS:
        raise InputError(f"device {name!r} is unknown; choose one of {', '.join(DEVICE_RESOLVERS)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    return DEVICE_RESOLVERS[name]()


def _on_device(batch: Any, device: torch.device) -> Any:
    """A calibration batch (a tensor, or a tokenizer's mapping of tensors) on ``device``;
    on its own device it is returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {key: _on_device(value, device) for key, value in batch.items()}
        return batch if all(moved[key] is value for key, value in batch.items()) else moved
    return batch


def factors_on_cpu(factors: LayerFactors) -> LayerFactors:
    return dataclasses.replace(
        factors,
        twiddles=[t.cpu() for t in factors.twiddles],
        lowrank_twiddles=[t.cpu() for t in factors.lowrank_twiddles],
        families={name: factors_on_cpu(family) for name, family in factors.families.items()},
    )


def capture_batches(checkpoint: str | Path, config: dict[str, Any], calib: str, samples: int) -> list[Any]:
    """What layer-wise capture runs on: for the built-in text only its first part,
    whose 58 batches fill the default 4096 rows of both moments; the rest of it is for
    distillation, which reads every batch."""
    batches = calibration_batches(checkpoint, config, calib, samples)
    if calib == BUILTIN and config.get("model_type") != DEMO_MODEL_TYPE:
        first = builtin_corpus(None, split="calib", extended=False)
        return list(itertools.islice(batches, math.ceil(len(first) / TEXT_BATCH)))
    return list(batches)


def calibrated_layer(
    weight: torch.Tensor,
    layer: LayerPlan,
    calibration: LayerCalibration,
    steps: int,
    sweeps: int,
    families: bool = False,
) -> LayerFactors:
    """The structure with the lowest held-out output error within the layer's budget.

    With sequential calibration the structure is fitted to ``corrected_target`` in the
    metric of the compressed model's inputs, and ``reference_error`` reports the
    held-out error against the reference model's outputs. With ``families`` the best
    fit of every structure tried is kept too (``LayerFactors.families``), for
    ``--distill-select-steps``.
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
    candidates = [Candidate(s.name, str(s.chain), s.params, s.val_error) for s in choice.candidates]
    # a searching fit's row is followed by one row per geometry it tried
    candidates += [
        Candidate(s.name, what, params, error) for s in choice.candidates for what, params, error in s.tried
    ]
    reference_error = (
        paired_output_error(
            weight, _dense(best), calibration.reference_gram_val, calibration.cross_val, calibration.gram_val
        )
        if calibration.sequential
        else None
    )
    chosen = _layer_factors(weight, best, candidates, reference_error)
    kept: dict[str, LayerFactors] = {}
    if families:
        for fitted in choice.candidates:  # lowest held-out error first: each structure's best
            if fitted.structure not in kept:
                kept[fitted.structure] = (
                    chosen if fitted is best else _layer_factors(weight, fitted, candidates, None)
                )
    return dataclasses.replace(chosen, families=kept)


def _dense(fitted: Fitted) -> torch.Tensor:
    approx = fitted.chain.to_dense(fitted.twiddles)
    if fitted.lowrank_twiddles:
        approx = approx + fitted.lowrank_twiddles[0][0, 0] @ fitted.lowrank_twiddles[1][0, 0]
    return approx


def _layer_factors(
    weight: torch.Tensor, fitted: Fitted, candidates: list[Candidate], reference_error: float | None
) -> LayerFactors:
    weight_error = float((weight - _dense(fitted)).norm() / weight.norm().clamp_min(1e-30))
    return LayerFactors(
        structure=fitted.structure,
        chain=fitted.chain,
        twiddles=fitted.twiddles,
        rel_error=weight_error,
        candidates=candidates,
        lowrank_twiddles=fitted.lowrank_twiddles,
        output_error=fitted.val_error,
        reference_error=reference_error,
        fit=fitted.name,
    )


def calibrated_factors(
    checkpoint: str | Path,
    source: Checkpoint,
    layers: list[LayerPlan],
    recipe: Recipe,
    progress: Callable[[str, int, int], None] | None = None,
    done: Mapping[str, FinishedLayer] | None = None,
    finished: Callable[[FinishedLayer], None] | None = None,
    only: Collection[str] | None = None,
) -> CalibratedFactors:
    """Factors of every planned layer, fitted on calibration data.

    Captures the reference model's layer inputs once; with ``recipe.allocate ==
    "sensitivity"`` re-divides the layers' total budget by measured sensitivity;
    with ``recipe.sequential`` fits the layers in forward order, each on the inputs
    of the model whose earlier layers are already compressed.

    ``done`` (a resumed run's journal) are layers already fitted: they are not fitted
    again (sequential: they are swapped in, as if just fitted); a layer whose
    re-measured allocated budget differs from its journaled one is an ``InputError``.
    ``finished`` is called with each layer as soon as it is fitted. ``only`` (a rank's
    share of a ``torchrun`` run) are the layers to fit, if given: the others, unless
    ``done``, are neither captured nor fitted nor returned (the budgets and the
    sensitivity still cover every layer).
    """
    done = done or {}
    device = resolve_device(recipe.device)
    model = load_reference(source).to(device)  # through ``source``: permuted MLPs stay permuted
    batches = capture_batches(checkpoint, source.config or {}, recipe.calib, recipe.calib_samples)
    batches = [_on_device(batch, device) for batch in batches]
    names = [layer.name for layer in layers]
    fitted = set(names if only is None else only)
    calibration: dict[str, LayerCalibration] = {}
    if recipe.allocate == "sensitivity":
        captured = names
    else:  # capture stops once every captured layer is full: each one's moments are the same
        captured = (
            [] if recipe.sequential else [name for name in names if name not in done and name in fitted]
        )
    if captured:
        calibration = capture_inputs(model, captured, batches, max_samples=recipe.calib_samples)
        for name, layer_calibration in calibration.items():
            _check_reached(name, layer_calibration)
    sensitivity: dict[str, float] | None = None
    if recipe.allocate == "sensitivity":
        layers, sensitivity = _allocate(model, source, layers, calibration, split_batches(batches)[1])
    by_name = {layer.name: layer for layer in layers}
    order = forward_order(model, names, batches[0]) if recipe.sequential else names
    working = copy.deepcopy(model) if recipe.sequential else None
    factors: dict[str, LayerFactors] = {}
    seconds: dict[str, float] = {}
    for name in order:
        if name not in done and name not in fitted:
            continue  # another rank's
        begin = time.perf_counter()
        layer = by_name[name]
        if working is not None:
            calibration_of = functools.partial(
                capture_paired, model, working, name, batches, recipe.calib_samples
            )
        else:
            calibration_of = functools.partial(calibration.__getitem__, name)
        factors[name] = fit_or_resume(layer, source, device, recipe, done, calibration_of)
        if name in done:
            seconds[name] = done[name].seconds
        if working is not None:
            swap_factors(working, name, factors[name])
        if name not in done:
            seconds[name] = time.perf_counter() - begin
            if finished is not None:
                finished(FinishedLayer(name, factors[name], seconds[name], layer.budget))
        if progress is not None:
            progress(name, len(factors), len(fitted | set(done)))
    return CalibratedFactors(factors, {layer.name: layer.budget for layer in layers}, sensitivity, seconds)


@dataclass(frozen=True)
class CalibratedFactors:
    """Every layer's factors, the budget each layer got, when allocated by
    sensitivity each layer's measured sensitivity, and the seconds each layer took
    (its paired capture included when sequential)."""

    factors: Mapping[str, LayerFactors]
    budgets: dict[str, float]
    sensitivity: dict[str, float] | None
    seconds: dict[str, float]


def fit_or_resume(
    layer: LayerPlan,
    source: Checkpoint,
    device: torch.device,
    recipe: Recipe,
    done: Mapping[str, FinishedLayer],
    calibration_of: Callable[[], LayerCalibration],
) -> LayerFactors:
    """A layer's factors, on the CPU: a resumed run's journaled ones (their budget
    checked against the plan's), else fitted on ``calibration_of()``, which is called
    only then (a sequential run's paired capture is a forward pass)."""
    if layer.name in done:
        check_same_budget(done[layer.name], layer)
        return done[layer.name].factors
    weight = planned_weight(source, layer).to(device)
    return factors_on_cpu(
        calibrated_layer(
            weight,
            layer,
            calibration_of(),
            recipe.refine_steps,
            recipe.refine_sweeps,
            families=recipe.distill_select_steps > 0,
        )
    )


def check_same_budget(finished: FinishedLayer, layer: LayerPlan) -> None:
    if finished.budget != layer.budget:
        raise InputError(
            f"layer {layer.name}: the re-measured allocation gives budget {layer.budget:.6g}, the journal "
            f"{finished.budget:.6g} (different threads or device?); rerun without --resume"
        )


def _check_reached(name: str, calibration: LayerCalibration) -> None:
    if calibration.rows_train == 0 or calibration.rows_val == 0:
        raise InputError(f"layer {name}: the calibration data never reached it; check --calib")


def planned_weight(source: Checkpoint, layer: LayerPlan) -> torch.Tensor:
    return prepared_weight(source.load(layer.weight_name), layer.weight_name)


def swap_factors(model: torch.nn.Module, name: str, factors: LayerFactors) -> None:
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
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to(linear.weight.device))


def _allocate(
    model: torch.nn.Module,
    source: Checkpoint,
    layers: list[LayerPlan],
    calibration: dict[str, LayerCalibration],
    val_batches: list[Any],
) -> tuple[list[LayerPlan], dict[str, float]]:
    """Re-divide the layers' total parameter budget by measured sensitivity.

    Each layer is probed with its activation-aware SVD at its planned budget; the
    ranks ``allocate_ranks`` buys become each layer's budget fraction.
    """
    curves, shapes, replacements, floors = {}, {}, {}, {}
    for layer in layers:
        gram = calibration[layer.name].gram_train
        weight = planned_weight(source, layer).to(torch.float64).to(gram.device)
        m, n = weight.shape
        rank = max(1, rank_for_budget(m, n, layer.budget))
        u, v = activation_aware_lowrank(weight, gram, rank)
        approx = u[0, 0] @ v[0, 0]
        curves[layer.name] = lowrank_error_curve(weight, gram)
        shapes[layer.name] = (m, n)
        replacements[layer.name] = (approx, output_error(weight, approx, calibration[layer.name].gram_val))
        floors[layer.name] = max(1, rank // 4)  # no layer is starved below a quarter of its share
    sensitivity = measure_sensitivity(model, replacements, val_batches[:ALLOCATION_BATCHES])
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


def distill_factors(
    checkpoint: str | Path,
    source: Checkpoint,
    factors: Mapping[str, LayerFactors],
    recipe: Recipe,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], DistillResult]:
    """Distil the layer-wise ``factors`` against the reference model, in memory: they are
    swapped into the model of ``source`` (the checkpoint, permuted when ``--permute``
    permuted it) and trained there as ``recipe``'s ``distill_*`` keys say, on its
    ``device`` (see ``resolve_device``); ``progress`` gets (description, steps done,
    steps) after each step.

    Returns the distilled twiddles by artifact tensor name, and the held-out errors.
    The held-out batches (``data.held_out``, as in layer-wise calibration), up to
    ``data.DISTILL_VAL_BATCHES`` of them, judge; every other batch trains, text regrouped by
    length (``regrouped_by_length``, ``distill_batch`` sentences a step) so that steps do
    not compute on padding.
    """
    data = _DistillData.of(checkpoint, source, recipe)
    compressed = data.compressed(factors)
    result = distill(
        data.reference,
        compressed,
        data.train,
        data.val,
        recipe.distill_steps,
        recipe.distill_lr,
        objective=recipe.distill_objective,
        progress=_steps(progress),
    )
    twiddles = {
        name: t.detach().cpu() for name, t in compressed.state_dict().items() if name.endswith(".twiddle")
    }
    return twiddles, result


def _steps(
    progress: Callable[[str, int, int], None] | None, what: str = "distilling"
) -> Callable[[int, int, float], None] | None:
    if progress is None:
        return None

    def report_step(done: int, total: int, best: float) -> None:
        progress(f"{what}, best held-out error {best:.4f}", done, total)

    return report_step


@dataclass(frozen=True)
class _DistillData:
    """What every distillation of one run shares: the model source, the reference model
    and the (training, held-out) batches on ``device``."""

    source: Checkpoint
    reference: torch.nn.Module
    train: list[Any]
    val: list[Any]
    device: torch.device

    @classmethod
    def of(cls, checkpoint: str | Path, source: Checkpoint, recipe: Recipe):
        config = source.config or {}
        batches = list(calibration_batches(checkpoint, config, recipe.calib, recipe.calib_samples))
        train, val = distill_split(batches, train_batch=recipe.distill_batch)
        if not train or not val:
            raise InputError(
                f"--distill-steps needs at least {VAL_EVERY} calibration batches; give more --calib data"
            )
        target = resolve_device(recipe.device)
        train, val = ([_on_device(b, target) for b in part] for part in (train, val))
        return cls(source, load_reference(checkpoint).to(target), train, val, target)

    def compressed(self, factors: Mapping[str, LayerFactors]) -> torch.nn.Module:
        model = load_reference(self.source)
        for name, layer_factors in factors.items():
            swap_factors(model, name, layer_factors)
        return model.to(self.device)


LAYER_WISE = "layer-wise"  # the whole-model candidate of each layer's own choice


def whole_model_candidates(factors: Mapping[str, LayerFactors]) -> dict[str, dict[str, LayerFactors]]:
    """What ``--distill-select-steps`` compares, by name: ``layer-wise`` (each layer's
    choice), then one per structure family in ``LayerFactors.families`` (every layer's
    best fit of that family; a layer without one keeps its choice). A candidate with the
    same fit on every layer as an earlier one is left out."""
    options = {LAYER_WISE: {name: _without_families(f) for name, f in factors.items()}}
    families = dict.fromkeys(family for f in factors.values() for family in f.families)
    for family in families:
        option = {name: _without_families(f.families.get(family, f)) for name, f in factors.items()}
        fits = [option[name].fit for name in option]
        if all(fits != [other[name].fit for name in other] for other in options.values()):
            options[family] = option
    return options


def _without_families(factors: LayerFactors) -> LayerFactors:
    return dataclasses.replace(factors, families={}) if factors.families else factors


@dataclass(frozen=True)
class Selection:
    """The winner of ``select_by_distillation``: its layers' factors (twiddles after its
    short distillation), and the report section (what was tried, what was chosen)."""

    factors: dict[str, LayerFactors]
    report: dict[str, Any]


def select_by_distillation(
    checkpoint: str | Path,
    source: Checkpoint,
    factors: Mapping[str, LayerFactors],
    recipe: Recipe,
    progress: Callable[[str, int, int], None] | None = None,
) -> Selection:
    """Distil each of ``whole_model_candidates(factors)`` for ``recipe.distill_select_steps``
    steps (the same objective, step size and batches as the full distillation) and keep
    the one with the lowest held-out error (calibration data's held-out batches; ties: the
    earlier). Each short run keeps its best held-out state, so the winner's score is at
    most every candidate's error before distillation, the layer-wise choice's included."""
    options = whole_model_candidates(factors)
    data = _DistillData.of(checkpoint, source, recipe)
    steps = recipe.distill_select_steps
    tried: list[dict[str, Any]] = []
    best: tuple[float, str, dict[str, LayerFactors]] | None = None
    for label, option in options.items():
        compressed = data.compressed(option)
        result = distill(
            data.reference,
            compressed,
            data.train,
            data.val,
            steps,
            recipe.distill_lr,
            objective=recipe.distill_objective,
            progress=_steps(progress, f"selecting the start: {label}"),
        )
        tried.append(
            {
                "candidate": label,
                "fits": dict(collections.Counter(f.fit or f.structure for f in option.values())),
                "params": sum(f.params for f in option.values()),
                "val_output_error_before": result.val_before,
                "val_output_error_after": result.val_after,
            }
        )
        if best is None or result.val_after < best[0]:
            best = (result.val_after, label, _trained(option, compressed))
    assert best is not None
    report = {
        "steps": steps,
        "objective": result.objective,
        "lr": result.lr,
        "tried": tried,
        "chosen": best[1],
    }
    return Selection(best[2], report)


def _trained(option: Mapping[str, LayerFactors], model: torch.nn.Module) -> dict[str, LayerFactors]:
    """``option``'s factors with the twiddles ``model`` (its distilled copy) now holds."""
    trained = {}
    for name, factors in option.items():
        layer = model.get_submodule(name)
        trained[name] = dataclasses.replace(
            factors,
            twiddles=[t.detach().cpu().clone() for t in layer.twiddles],
            lowrank_twiddles=[t.detach().cpu().clone() for t in layer.lowrank_twiddles],
        )
    return trained
