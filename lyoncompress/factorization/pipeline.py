"""The ``factorize`` verb: checkpoint -> plan -> factors -> artifact, one layer at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import companion_files, write_artifact
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.distributed import (
    PeerFailed,
    Ranks,
    agreed,
    broadcast_from_leader,
    launched_ranks,
    process_group,
    shared_out,
)
from lyoncompress.errors import InputError
from lyoncompress.factorization.calibrated import (
    CalibratedFactors,
    calibrated_factors,
    distill_factors,
    resolve_device,
    select_by_distillation,
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

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks share the layer fits and rank 0
    writes ``out`` (see README, "Several processes").

    Returns:
        The report (also written to ``out/report.json``); on the other ranks of a
        ``torchrun`` run only ``{"command", "rank", "fitted"}`` (the layers it fitted).

    Example:
        >>> report = factorize("model.safetensors", "fact/", Recipe(method="monarch"))
        >>> report["totals"]["ratio"]
        0.5
    """
    recipe = recipe or Recipe()
    out = Path(out)
    _check_methods(recipe)
    device = resolve_device(recipe.device)  # --device cuda without a GPU fails before any work
    if recipe.order not in ORDERS:
        raise InputError(f"unknown order {recipe.order!r}; choose one of {', '.join(ORDERS)}")
    # weight-only fits run on the cpu: only a calibrated run's ranks talk over the GPU's backend
    with process_group(launched_ranks(), device if recipe.calib else torch.device("cpu")) as ranks:
        return _factorize(checkpoint, out, recipe, force, progress if ranks.leader else None, resume, ranks)


def _factorize(
    checkpoint: str | Path,
    out: Path,
    recipe: Recipe,
    force: bool,
    progress: Progress | None,
    resume: bool,
    ranks: Ranks,
) -> dict[str, Any]:
    """Every rank plans and fits its share of the layers; rank 0 alone claims OUT, keeps
    the journal that all ranks write into and writes the artifact from it."""
    phases = Phases()
    output: Output | None = None
    journal: Journal | None = None
    with contextlib.ExitStack() as claimed:
        with agreed(ranks):
            if ranks.leader:  # the claim lasts until the artifact is written
                output = claimed.enter_context(
                    claim_output(out, force, [checkpoint, *data_paths(recipe.calib)])
                )
            source = open_checkpoint(checkpoint)
            plan = make_plan(source, recipe)
            stamp = _stamp(source, recipe)
            if ranks.world > 1 and recipe.sequential:
                raise InputError(
                    "--sequential fits each layer on the outputs of the layers compressed before it, "
                    "which one process must do; run it without torchrun"
                )
            if output is not None:
                journal, notes = Journal.open(output.path, stamp, resume)
                output.notes.extend(notes)
                if ranks.world > 1:
                    journal.create()  # before any rank writes an entry into it
        shares = broadcast_from_leader(ranks, journal and _shares(plan, journal, ranks))
        journal = journal or Journal(Path(shares.folder), stamp, {})
        try:
            report = _run(checkpoint, output, recipe, progress, source, plan, journal, phases, ranks, shares)
        except (InputError, PeerFailed) as err:
            # bad input (a NaN weight, data that never reaches a layer) must change before a
            # rerun, which the journal's fingerprint would then refuse: nothing is kept. A full
            # disk or a permission problem is fixed outside the input: its journal stays
            if ranks.leader and not _keeps_journal(err):
                journal.remove()
            raise
        if output is not None:
            report["warnings"] = [*output.notes, *report["warnings"]]
        return report


def _keeps_journal(err: InputError | PeerFailed) -> bool:
    if isinstance(err, PeerFailed):
        return err.internal or err.os_error
    return isinstance(err.__cause__, OSError)


def _stamp(source: Checkpoint, recipe: Recipe) -> str:
    files = [*input_files(source.path), *(f for p in data_paths(recipe.calib) for f in input_files(p))]
    # the device the calibrated steps run on decides their bits; weight-only fits run on the cpu
    device = str(resolve_device(recipe.device)) if recipe.calib else "cpu"
    return fingerprint(recipe.to_dict() | {"device": device}, source.infos, files)


@dataclass(frozen=True)
class Shares:
    """What rank 0 tells the others: the journal's ``folder`` and fingerprint, and the
    rank that fits each layer not journaled yet (``owners``, by layer name)."""

    folder: str
    stamp: str
    owners: dict[str, int]


def _shares(plan: Plan, journal: Journal, ranks: Ranks) -> Shares:
    sizes = {
        layer.name: layer.shape[0] * layer.shape[1] for layer in plan.layers if layer.name not in journal.done
    }
    return Shares(str(journal.folder), journal.stamp, shared_out(sizes, ranks.world))


def _run(
    checkpoint: str | Path,
    output: Output | None,
    recipe: Recipe,
    progress: Progress | None,
    source: Checkpoint,
    plan: Plan,
    journal: Journal,
    phases: Phases,
    ranks: Ranks,
    shares: Shares,
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

    mine = {name for name, rank in shares.owners.items() if rank == ranks.rank}
    calibrated, streamed, stream_why = None, None, ""
    with agreed(ranks):
        if journal.stamp != shares.stamp:
            raise InputError(
                f"rank {ranks.rank} sees another checkpoint, recipe or calibration data than rank 0 "
                "(their fingerprints differ); give every rank the same inputs"
            )
        if recipe.calib and ranks.world > 1:
            if recipe.stream == "on":
                raise InputError(
                    "--stream on runs in one process; under torchrun the ranks share the layer fits "
                    "of the whole-model path (use --stream auto or off)"
                )
            stream_why = "torchrun: the ranks share the layer fits of the whole-model path"
            calibrated = calibrated_factors(
                checkpoint, source, plan.layers, recipe, progress, journal.done, journaled, mine
            )
        elif recipe.calib:
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
        elif ranks.world > 1:
            _fit_share(source, plan, recipe, mine, progress, journaled)
    if not ranks.leader:
        return {"command": "factorize", "rank": ranks.rank, "fitted": sorted(mine)}
    if ranks.world > 1:
        journal.reload()  # every rank's layers, which the stream below takes from the journal
        if calibrated is not None:
            calibrated = _merged(calibrated, plan, journal)
        phases.done("layer fits" if calibrated is None else "calibrated fits")
    elif calibrated is not None:
        phases.done("calibrated fits")
    assert output is not None  # rank 0 holds the claim
    layers: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}

    def finish_report() -> dict[str, Any]:
        # called by the writer once every layer has been factorized
        phases.done("fit and write" if calibrated is None and ranks.world == 1 else "write")
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
        selection = None
        if recipe.distill_select_steps:  # the start: the best of short distillations
            selection = select_by_distillation(checkpoint, source, calibrated.factors, recipe, progress)
            calibrated = dataclasses.replace(calibrated, factors=selection.factors)
            phases.done("distill select")
        distilled, result = distill_factors(checkpoint, source, calibrated.factors, recipe, progress)
        distill_section = {
            "objective": result.objective,
            "lr": result.lr,
            "schedule": result.schedule,
            "steps": result.steps,
            "val_output_error_before": result.val_before,
            "val_output_error_after": result.val_after,
            "val_history": [list(check) for check in result.history],  # (steps done, held-out value)
        } | ({"select": selection.report} if selection is not None else {})
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


def _fit_share(
    source: Checkpoint,
    plan: Plan,
    recipe: Recipe,
    mine: set[str],
    progress: Progress | None,
    journaled: Callable[[FinishedLayer], None],
) -> None:
    """Fit this rank's layers on weight error, each journaled as soon as it is done."""
    share = [layer for layer in plan.layers if layer.name in mine]
    for index, layer in enumerate(share):
        begin = time.perf_counter()
        factors = factorize_layer(source.load(layer.weight_name), layer, recipe)
        journaled(FinishedLayer(layer.name, factors, time.perf_counter() - begin, layer.budget))
        if progress is not None:
            progress(layer.name, index + 1, len(share))


def _merged(calibrated: CalibratedFactors, plan: Plan, journal: Journal) -> CalibratedFactors:
    """Rank 0's calibrated result with every rank's layers, as journaled."""
    done = {layer.name: journal.done[layer.name] for layer in plan.layers}
    return dataclasses.replace(
        calibrated,
        factors={name: finished.factors for name, finished in done.items()},
        seconds={name: finished.seconds for name, finished in done.items()},
    )


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
    if factors.output_error is not None and runner_up.rel_error < chosen:
        return (
            f"held-out output error {chosen:.4f}: its structure family won --distill-select-steps; "
            f"lowest of {len(factors.candidates)} candidates: {runner_up.structure} {runner_up.rel_error:.4f}"
        )
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
