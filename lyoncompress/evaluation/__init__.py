"""The ``evaluate`` verb: run tasks on reference and compressed models, check the gates."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lyoncompress.artifact import Artifact, load_artifact
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.data import Samples, load_samples
from lyoncompress.errors import InputError
from lyoncompress.evaluation.tasks import FITTING, GATED_BY, TASKS, EvalContext, TaskResult
from lyoncompress.recipe import DEFAULT_EVAL_SAMPLES, EvalConfig, Gates

DEFAULT_SAMPLES = DEFAULT_EVAL_SAMPLES


def check_same_model(reference: Checkpoint, artifact: Artifact) -> None:
    """Every artifact tensor must come from the reference: same names, same shapes."""
    for name, record in artifact.layers.items():
        info = reference.infos.get(f"{name}.weight")
        expected = (record.out_features, record.in_features)
        if info is None or info.shape != expected:
            found = "missing" if info is None else f"shape {info.shape}"
            raise InputError(
                f"reference and artifact differ: artifact layer {name} is {expected}, "
                f"reference {name}.weight is {found}"
            )
    compressed = tuple(f"{name}." for name in artifact.layers)
    for name in artifact.tensors.names():
        if name.startswith(compressed) and not name.endswith(".bias"):
            continue
        info = reference.infos.get(name)
        if info is None or info.shape != artifact.tensors.infos[name].shape:
            found = "missing" if info is None else f"shape {info.shape}"
            raise InputError(
                f"reference and artifact differ: artifact tensor {name} has shape "
                f"{artifact.tensors.infos[name].shape}, reference: {found}"
            )


# gate kind of a task -> (Gates field, comparison shown, test)
_GATE_RULES: dict[str, tuple[str, str, Callable[[float, float], bool]]] = {
    "recovery": ("min_recovery", ">=", operator.ge),
    "output_error": ("max_output_error", "<=", operator.le),
}


def _gate(task: str, result: TaskResult, gates: Gates) -> dict[str, Any] | None:
    if result.gate is None:
        return None
    field, shown, holds = _GATE_RULES[result.gate]
    threshold = getattr(gates, field)
    if threshold is None:
        return None
    return {
        "task": task,
        "metric": result.gate,
        "value": result.gate_value,
        "threshold": f"{shown} {threshold}",
        # NaN compares false either way, but Inf passes ">= 0.9": no non-finite value passes
        "passed": math.isfinite(result.gate_value) and holds(result.gate_value, threshold),
    }


def _check_gates_measurable(gates: Gates, chosen: list[str]) -> None:
    """A gate that no selected task measures would pass without being checked: refuse it."""
    measured = {GATED_BY[name] for name in chosen}
    for kind, (field, _, _) in _GATE_RULES.items():
        if getattr(gates, field) is not None and kind not in measured:
            tasks = [name for name, gate in GATED_BY.items() if gate == kind]
            raise InputError(
                f"--{field.replace('_', '-')}: no selected task measures it (tasks: {', '.join(chosen)}); "
                f"add --task {' or --task '.join(tasks)}"
            )


def _non_finite(results: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{task}.{metric}"
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]


def evaluate(
    artifact: str | Path,
    reference: str | Path,
    config: EvalConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Compare a compressed artifact with its reference checkpoint.

    Args:
        artifact: folder written by ``factorize`` or ``quantize``.
        reference: the original checkpoint (HF folder for models that must run).
        config: tasks, data, samples and gates (default ``EvalConfig()``: every task
            that fits the model, on built-in data, no gate).
        progress: called after each task with (task, done, total).

    Returns:
        ``{"tasks": {name: metrics}, "layers": {...}, "gates": [...], "passed": bool}``.

    Example:
        >>> report = evaluate("fact/", "model/", EvalConfig(gates=Gates(min_recovery=0.99)))
        >>> report["passed"]
        True
    """
    config = config or EvalConfig()
    gates, samples, seed = config.gates, config.samples, config.seed
    art = load_artifact(artifact)
    ref = open_checkpoint(reference)
    check_same_model(ref, art)
    data = config.data
    loaded: Samples | None = load_samples(data, samples, seed) if data is not None else None
    ctx = EvalContext(Path(reference), ref, art, loaded, samples, seed)
    fitting = FITTING[ctx.kind]
    chosen = list(config.tasks) if config.tasks else list(fitting)
    for name in chosen:
        if name not in TASKS:
            raise InputError(f"unknown task {name!r}; registered tasks: {', '.join(TASKS)}")
        if name not in fitting:
            raise InputError(
                f"task {name!r} does not fit this model ({ctx.kind}); tasks that do: {', '.join(fitting)}"
            )
    _check_gates_measurable(gates, chosen)
    results: dict[str, Any] = {}
    layer_rows: dict[str, dict[str, Any]] = {}
    checks = []
    for index, name in enumerate(chosen):
        result = TASKS[name](ctx)
        results[name] = {**result.metrics, **({result.gate: result.gate_value} if result.gate else {})}
        for row in result.layers:
            layer_rows.setdefault(row["name"], {}).update(row)
        check = _gate(name, result, gates)
        if check is not None:
            checks.append(check)
        if progress is not None:
            progress(name, index + 1, len(chosen))
    # a model whose outputs or metrics are NaN or infinite fails every gate, and the
    # evaluation as a whole, even where no gate was asked for
    non_finite = _non_finite(results)
    for check in checks:
        check["passed"] = check["passed"] and not non_finite
    return {
        "command": "eval",
        "artifact": str(artifact),
        "reference": str(reference),
        "model_kind": ctx.kind,
        "gates_given": asdict(gates),
        "tasks": results,
        "layers": list(layer_rows.values()),
        "gates": checks,
        "non_finite": non_finite,
        "passed": not non_finite and all(check["passed"] for check in checks),
    }


__all__ = ["DEFAULT_SAMPLES", "EvalConfig", "Gates", "TASKS", "evaluate"]
