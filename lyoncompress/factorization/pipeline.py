"""The ``factorize`` verb: checkpoint -> plan -> factors -> artifact, one layer at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import companion_files, write_artifact
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.factorization.calibrated import (
    CalibratedFactors,
    calibrated_factors,
    distill_factors,
    resolve_device,
)
from lyoncompress.factorization.journal import FinishedLayer, Journal, fingerprint, input_files
from lyoncompress.factorization.methods import LayerFactors, fit_weight, prepared_weight
from lyoncompress.factorization.permute import permutation_report, permuted_checkpoint, search_pairs
from lyoncompress.factorization.projection import ORDERS
from lyoncompress.factorization.streaming import stream_choice, streamed_factors
from lyoncompress.output import Output, claim_output, data_paths
from lyoncompress.plan import LayerPlan, Plan, make_plan
from lyoncompress.recipe import Recipe, parse_size
from lyoncompress.report import Phases
from lyoncompress.schema import DType, LayerRecord, Structure
from lyoncompress.structures import check_method

Progress = Callable[[str, int, int], None]  # (layer name, index done, total)


def factorize(
    checkpoint: str | Path,
    out: str | Path,
    recipe: Recipe | None = None,
    force: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Compress the selected layers of ``checkpoint`` into a new artifact at ``out``.

    Each finished layer is journaled beside ``out`` (``.OUT.journal/``, see
    ``factorization.journal``); the journal is removed once ``out`` is written.

    Args:
        checkpoint: ``.safetensors`` file, HF model folder or ``.bin``/``.pt`` state dict.
        out: artifact folder to create (refused if it exists, unless ``force``).
        recipe: options (defaults: ``Recipe()``: auto method, budget 0.5).
        force: replace an existing ``out``.
        progress: called after each compressed layer with (name, done, total).
        resume: continue from the journal of an interrupted run with the same recipe
            and checkpoint (else an ``InputError``); the artifact is the one an
            uninterrupted run writes. Without it an existing journal is replaced.

    Returns:
        The report (also written to ``out/report.json``).

    Example:
        >>> report = factorize("model.safetensors", "fact/", Recipe(method="monarch"))
        >>> report["totals"]["ratio"]
        0.5
    """
    recipe = recipe or Recipe()
    out = Path(out)
    _check_methods(recipe)
    resolve_device(recipe.device)  # --device cuda without a GPU fails before any work
    if recipe.order not in ORDERS:
        raise InputError(f"unknown order {recipe.order!r}; choose one of {', '.join(ORDERS)}")
    with claim_output(out, force, [checkpoint, *data_paths(recipe.calib)]) as output:
        report = _factorize(checkpoint, output, recipe, progress, resume)
        report["warnings"] = [*output.notes, *report["warnings"]]
        return report


def _factorize(
    checkpoint: str | Path, output: Output, recipe: Recipe, progress: Progress | None, resume: bool
) -> dict[str, Any]:
    phases = Phases()
    source = open_checkpoint(checkpoint)
    plan = make_plan(source, recipe)
    files = [*input_files(source.path), *(f for p in data_paths(recipe.calib) for f in input_files(p))]
    # the device the calibrated steps run on decides their bits; weight-only fits run on the cpu
    device = str(resolve_device(recipe.device)) if recipe.calib else "cpu"
    stamp = fingerprint(recipe.to_dict() | {"device": device}, source.infos, files)
    journal, notes = Journal.open(output.path, stamp, resume)
    output.notes.extend(notes)
    try:
        return _run(checkpoint, output, recipe, progress, source, plan, journal, phases)
    except InputError as err:
        # bad input (a NaN weight, data that never reaches a layer) must change before a
        # rerun, which the journal's fingerprint would then refuse: nothing is kept. A full
        # disk or a permission problem is fixed outside the input: its journal stays
        if not isinstance(err.__cause__, OSError):
            journal.remove()
        raise


def _run(
    checkpoint: str | Path,
    output: Output,
    recipe: Recipe,
    progress: Progress | None,
    source: Checkpoint,
    plan: Plan,
    journal: Journal,
    phases: Phases,
) -> dict[str, Any]:
    started = time.perf_counter()
    phases.done("plan")
    permutations = search_pairs(plan, source, recipe.order, progress) if recipe.permute else []
    if permutations:
        source = permuted_checkpoint(source, permutations)
    if recipe.permute:
        phases.done("permute")
    dtypes = {layer.name: source.infos[layer.weight_name].dtype for layer in plan.layers}
    by_name = {layer.name: layer for layer in plan.layers}

    def journaled(finished: FinishedLayer) -> None:
        layer, factors = by_name[finished.name], finished.factors
        record = layer_record(layer, factors, dtypes[layer.name]).to_json()
        journal.record(finished, report_row(layer, factors, finished.seconds), record)

    calibrated, streamed = None, None
    stream_why = ""
    if recipe.calib:
        choice = stream_choice(source, plan.layers, recipe)
        stream_why = choice.why
        if choice.model is not None:
            streamed = streamed_factors(
                checkpoint, source, plan.layers, recipe, choice, progress, journal.done, journaled
            )
            calibrated = streamed.calibrated
        else:
            calibrated = calibrated_factors(
                checkpoint, source, plan.layers, recipe, progress, journal.done, journaled
            )
        phases.done("calibrated fits")
    layers: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}

    def finish_report() -> dict[str, Any]:
        # called by the writer once every layer has been factorized
        phases.done("write" if calibrated is not None else "fit and write")
        report.update(
            command="factorize",
            source=str(source.path),
            recipe=recipe.to_dict(),
            warnings=plan.warnings,
            error_metric="held-out output error" if calibrated else "weight error",
            layers=rows,
            totals=totals(rows, source),
            seconds=round(time.perf_counter() - started, 3),
            phases=phases.rows,
        )
        if recipe.permute:
            report["permutations"] = permutation_report(permutations)
        if recipe.distill_steps:
            report["distill"] = distill_section
        if recipe.calib:
            report["stream"] = {"used": streamed is not None, "why": stream_why} | (
                streamed.report if streamed is not None else {}
            )
        if calibrated is not None and calibrated.sensitivity is not None:
            report["allocation"] = {
                "method": "sensitivity",
                "budgets": calibrated.budgets,
                "sensitivity": calibrated.sensitivity,
            }
        return report

    # distillation trains every layer's factors together, in memory, before the one write
    distilled: dict[str, torch.Tensor] = {}
    if streamed is not None:
        # block-wise distillation ran inside the calibrated fits' phase
        distilled, distill_section = streamed.distilled, streamed.distill
    elif recipe.distill_steps:
        distilled, result = distill_factors(
            checkpoint,
            source,
            calibrated.factors,
            recipe.calib,
            recipe.calib_samples,
            recipe.distill_steps,
            recipe.distill_lr,
            progress,
            recipe.device,
        )
        distill_section = {
            "objective": result.objective,
            "lr": result.lr,
            "steps": result.steps,
            "val_output_error_before": result.val_before,
            "val_output_error_after": result.val_after,
        }
        phases.done("distill")
    stream = _stream(source, plan, recipe, calibrated, layers, rows, progress, distilled, journal, journaled)
    write_artifact(
        output.path,
        stream,
        layers,
        dict(source.config or {}),
        finish_report,
        parse_size(recipe.max_shard_size),
        output.force,
        companion_files(source.path),
    )
    journal.remove()
    return report


def _check_methods(recipe: Recipe) -> None:
    """Method names must be ``auto`` or registered structures (with or without calibration)."""
    for name in sorted({recipe.method, *(o.method for o in recipe.layers if o.method)}):
        check_method(name)


def _stream(
    source: Checkpoint,
    plan: Plan,
    recipe: Recipe,
    calibrated: CalibratedFactors | None,
    layers: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    progress: Progress | None,
    distilled: dict[str, torch.Tensor],
    journal: Journal,
    journaled: Callable[[FinishedLayer], None],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Source tensors in order, each target weight replaced by its factors (computed
    here, one layer at a time and journaled, taken from the journal, or computed
    beforehand on calibration data); ``distilled`` twiddles (by tensor name) replace
    the layer-wise ones, which the report rows describe."""
    by_weight = {layer.weight_name: layer for layer in plan.layers}
    for name in source.names():
        tensor = source.load(name)
        layer = by_weight.get(name)
        if layer is None:
            yield name, tensor  # untouched: same name, same bytes
            continue
        if calibrated is not None:
            factors, seconds = calibrated.factors[layer.name], calibrated.seconds[layer.name]
        elif layer.name in journal.done:
            factors, seconds = journal.done[layer.name].factors, journal.done[layer.name].seconds
        else:
            begin = time.perf_counter()
            factors = factorize_layer(tensor, layer, recipe)
            seconds = time.perf_counter() - begin
            journaled(FinishedLayer(layer.name, factors, seconds, layer.budget))
        layers[layer.name] = layer_record(layer, factors, tensor.dtype).to_json()
        rows.append(report_row(layer, factors, seconds))
        for group, twiddles in (("factors", factors.twiddles), ("lowrank", factors.lowrank_twiddles)):
            for index, twiddle in enumerate(twiddles):
                name = f"{layer.name}.{group}.{index}.twiddle"
                yield name, distilled.get(name, twiddle).to(tensor.dtype)
        if progress is not None and calibrated is None:
            progress(layer.name, len(rows), len(plan.layers))


def factorize_layer(weight: torch.Tensor, layer: LayerPlan, recipe: Recipe) -> LayerFactors:
    """Factorize one weight by the layer's method on weight error (see ``prepared_weight``)."""
    weight = prepared_weight(weight, layer.weight_name)
    return fit_weight(layer.method, weight, layer.budget, layer.depth, recipe.order)


def layer_record(layer: LayerPlan, factors: LayerFactors, dtype: torch.dtype) -> LayerRecord:
    """The layer's record in the artifact metadata (see docs/FORMAT.md), validated."""
    return LayerRecord(
        structure=Structure(factors.structure),
        in_features=layer.shape[1],
        out_features=layer.shape[0],
        chain=tuple(p.as_tuple() for p in factors.chain.patterns),
        lowrank_rank=factors.lowrank_twiddles[0].shape[-1] if factors.lowrank_twiddles else 0,
        bias=layer.has_bias,
        dtype=DType.of(dtype),
        quantization=None,
    )


def report_row(layer: LayerPlan, factors: LayerFactors, seconds: float) -> dict[str, Any]:
    dense = layer.shape[0] * layer.shape[1]
    return {
        "name": layer.name,
        "shape": list(layer.shape),
        "structure": factors.structure,
        "fit": factors.fit or factors.structure,
        "chain": str(factors.chain),
        "params_before": dense,
        "params_after": factors.params,
        "ratio": round(factors.params / dense, 4),
        "rel_error": factors.rel_error,
        "output_error": factors.output_error,
        "reference_error": factors.reference_error,
        "seconds": round(seconds, 3),
        "why": _why(factors),
        "candidates": [asdict(c) for c in factors.candidates],
    }


def _why(factors: LayerFactors) -> str:
    metric = "weight error" if factors.output_error is None else "held-out output error"
    chosen = factors.rel_error if factors.output_error is None else factors.output_error
    chosen_label = factors.fit or factors.structure
    others = [c for c in factors.candidates if c.structure != chosen_label]
    if not others:
        return f"lowest {metric} of {len(factors.candidates)} {chosen_label} candidates"
    runner_up = min(others, key=lambda c: c.rel_error)
    return (
        f"lowest {metric} {chosen:.4f} of {len(factors.candidates)} candidates; "
        f"best other: {runner_up.structure} {runner_up.rel_error:.4f}"
    )


def totals(rows: list[dict[str, Any]], source: Checkpoint) -> dict[str, Any]:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    model_before = sum(_numel(info.shape) for info in source.infos.values())
    return {
        "layers": len(rows),
        "params_before": before,
        "params_after": after,
        "ratio": round(after / before, 4) if before else None,
        "model_params_before": model_before,
        "model_params_after": model_before - before + after,
    }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
