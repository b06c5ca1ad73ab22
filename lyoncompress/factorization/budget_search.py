"""Budget search: the smallest global budget whose factorized model meets a recovery gate.

Each step factorizes the checkpoint at one global budget into a scratch folder beside
OUT, evaluates it against the checkpoint, and keeps it only while it is the smallest
passing budget seen. Bisection runs between the last failing and the smallest passing
budget, so the answer is within ``tolerance`` of a failing budget. The metric need not
be monotone in the budget: the kept artifact is the smallest budget that *was measured*
to pass, never an extrapolation. Nothing but OUT outlives the call, on success, error
or Ctrl-C; when no budget passes, OUT is not written at all (a CI job must not pick up
an artifact that failed its gate).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lyoncompress.checkpoint import open_checkpoint, tensor_bytes
from lyoncompress.data import load_samples
from lyoncompress.errors import InputError
from lyoncompress.evaluation import evaluate
from lyoncompress.evaluation.tasks import FITTING, model_kind
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.output import Output, check_replaceable, claim_output, data_paths
from lyoncompress.recipe import SEARCH_METRICS, EvalConfig, Recipe, SearchConfig, parse_size

# Model kind -> the task searched when none is named: the kind's own recovery task.
DEFAULT_TASKS: dict[str, str] = {
    "mlp": "classification",
    "encoder": "embeddings",
    "causal-lm": "perplexity",
}


# The search's options are a recipe section (``search:``); the old name stays.
BudgetSearch = SearchConfig


@dataclass(frozen=True)
class SearchStep:
    """One point of the curve: a global budget, what it kept, what it scored."""

    budget: float
    params_ratio: float  # compressed params / dense params of the compressed layers
    metric: float
    passed: bool


StepProgress = Callable[[SearchStep, int, int], None]  # (step, steps done, most steps)


def search_budget(
    checkpoint: str | Path,
    out: str | Path,
    search: SearchConfig,
    recipe: Recipe | None = None,
    force: bool = False,
    progress: StepProgress | None = None,
) -> dict[str, Any]:
    """Factorize ``checkpoint`` at the smallest global budget that meets ``search``'s gate.

    Only ``recipe.budget`` moves; per-layer overrides that set their own budget keep it.

    Args:
        checkpoint: as for ``factorize``; it must be runnable (a ``config.json`` with
            ``model_type``) since every step is evaluated against it.
        out: artifact folder, written only when some budget passes.
        search: target, task, bounds and stopping rule.
        recipe: every other factorize option (default ``Recipe()``).
        force: replace an existing ``out``.
        progress: called after each step with (step, steps done, ``search.max_steps``).

    Returns:
        The chosen artifact's factorize report with a ``budget_search`` section
        (curve, chosen budget, ``passed``) and the chosen artifact's ``eval``. When no
        budget passes, ``passed`` is False, ``chosen_budget`` None, the rest of the
        report describes the ``high`` budget, and nothing is written at ``out``.

    Example:
        >>> search = SearchConfig(min_recovery=0.99)  # demo MLP: classification recovery
        >>> report = search_budget("demo-mlp/", "fact/", search, Recipe(method="lowrank"))
        >>> report["budget_search"]["chosen_budget"]
        0.158048
    """
    recipe = recipe or Recipe()
    inputs = [checkpoint, *data_paths(recipe.calib, search.data)]
    with claim_output(out, force, inputs) as output:
        report = _search(checkpoint, output, search, recipe, progress)
        report["warnings"] = [*output.notes, *report.get("warnings", [])]
        return report


def _search(
    checkpoint: str | Path,
    output: Output,
    search: BudgetSearch,
    recipe: Recipe,
    progress: StepProgress | None,
) -> dict[str, Any]:
    out = output.path
    task, metric = gated_metric(checkpoint, search)
    if search.data is not None:
        load_samples(search.data, search.samples, 0)  # a bad data file fails before any work
    started = time.perf_counter()
    curve: list[SearchStep] = []
    # (budget, artifact folder, factorize report, eval report) of the smallest pass so far
    best: tuple[float, Path, dict[str, Any], dict[str, Any]] | None = None
    high_report: dict[str, Any] = {}  # the first step's: what is reported when nothing passes
    stage = output.scratch("search")
    try:

        def trial(budget: float) -> bool:
            nonlocal best, high_report
            folder = stage / f"step-{len(curve)}"
            report = factorize(checkpoint, folder, recipe.replace(budget=budget))
            evaluation = evaluate(
                folder, checkpoint, EvalConfig(tasks=(task,), data=search.data, samples=search.samples)
            )
            value = float(evaluation["tasks"][task][metric])
            step = SearchStep(budget, report["totals"]["ratio"], value, value >= search.min_recovery)
            curve.append(step)
            high_report = high_report or report
            if step.passed and (best is None or budget < best[0]):
                if best is not None:
                    shutil.rmtree(best[1])
                best = (budget, folder, report, evaluation)
            else:
                shutil.rmtree(folder)
            if progress is not None:
                progress(step, len(curve), search.max_steps)
            return step.passed

        failing = _bisect(trial, search)
        section = {
            "task": task,
            "metric": metric,
            "min_recovery": search.min_recovery,
            "low": search.low,
            "high": search.high,
            "tolerance": search.tolerance,
            "max_steps": search.max_steps,
            "curve": [asdict(step) for step in curve],
            "chosen_budget": best[0] if best else None,
            "largest_failing_budget": failing,
            # the answer is within tolerance of a measured failure (or is the low bound)
            "converged": best is not None
            and (best[0] == search.low or (failing is not None and best[0] - failing <= search.tolerance)),
            "passed": best is not None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if search.max_bytes is not None:
            # bytes grow with the budget: the smallest pass is the smallest passing artifact
            size = None if best is None else tensor_bytes(best[1])
            section.update(max_bytes=parse_size(search.max_bytes), smallest_passing_bytes=size)
            if size is not None and size > section["max_bytes"]:
                section.update(passed=False, too_large_budget=best[0], chosen_budget=None)
                return {**high_report, "budget_search": section}
        if best is None:
            return {**high_report, "budget_search": section}
        _, folder, report, evaluation = best
        report = {**report, "budget_search": section, "eval": evaluation}
        # the report must name OUT, not the scratch folder it was evaluated in
        evaluation["artifact"] = str(out)
        (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        _move_into_place(folder, out, stage, output.force)
        return report
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def gated_metric(checkpoint: str | Path, search: SearchConfig) -> tuple[str, str]:
    """``(task, metric)`` that ``search`` gates on for this checkpoint; a task that does
    not fit the model, or a model that cannot run, is an ``InputError``."""
    kind = model_kind(open_checkpoint(checkpoint).config)
    if kind not in DEFAULT_TASKS:
        raise InputError(
            f"{checkpoint}: a {kind} checkpoint cannot be run, so no recovery can be measured; "
            "--min-recovery needs a model folder with a config.json naming its model_type"
        )
    task = search.task or DEFAULT_TASKS[kind]
    if task not in FITTING[kind]:
        fitting = [t for t in FITTING[kind] if t in SEARCH_METRICS]
        raise InputError(f"--eval-task {task!r} does not fit this {kind} model; choose {', '.join(fitting)}")
    return task, SEARCH_METRICS[task]


def _bisect(trial: Callable[[float], bool], search: SearchConfig) -> float | None:
    """Run trials; return the largest failing budget below the smallest passing one.

    ``high`` first (if it fails, the target is unreachable), then ``low`` (if it
    passes, nothing smaller is searched), then midpoints of [failing, passing].
    """
    if not trial(search.high):
        return search.high
    if trial(search.low):
        return None
    failing, passing = search.low, search.high
    steps = 2
    while steps < search.max_steps and passing - failing > search.tolerance:
        # rounded so that the budgets in the report read as typed, not 0.48500000000000004
        middle = round((failing + passing) / 2, 6)
        if trial(middle):
            passing = middle
        else:
            failing = middle
        steps += 1
    return failing


def _move_into_place(folder: Path, out: Path, stage: Path, force: bool) -> None:
    """Rename the chosen artifact to ``out``; an old ``out`` (force) goes into the stage
    only once the new one is there, and is deleted with it."""
    check_replaceable(out, force)  # again: the search may have run for hours
    if out.exists():
        out.rename(stage / "replaced")
    folder.rename(out)
