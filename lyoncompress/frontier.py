"""The rate-distortion report: the gated metric against whole-artifact bytes.

``frontier`` answers "was factorizing worth it?": it measures, on one held-out set,

* the dense model quantized as it is (``quantize --dense``), per format, with plain
  round-to-nearest (``none``) and with ``feedback`` for the integer formats, and
* the model factorized at several budgets for each structure, then quantized,

every artifact carrying the same plain weights quantized alongside (``include_dense``,
by default every matrix: embeddings, attention, heads), so that its bytes are the
whole file's. ``bytes`` is the sum of the tensor data of the written artifact
(safetensors headers excluded). A point is Pareto-optimal when no other point is at
most as large and at least as good, one of the two strictly.

The points are kept in ``OUT/frontier.json``; a later call with the same settings
reuses the points it finds there, so a long sweep can be run in parts. Parts may also
run at the same time into one folder (e.g. one budget each): every call works in a
scratch folder of its own, and each write merges the points that other calls have
written since (under a lock on ``OUT/.frontier.lock``), so none is lost. A call skips
the points another running call has taken (``OUT/.frontier-claims.json``: a dense point
by its label, a factorized one by its structure and budget, so that one call factorizes
it and measures its formats), so the same command started twice splits the sweep.

With a ``FrontierSearch`` (``--min-recovery F [--max-bytes SIZE]``) the report also
picks, among every measured point, the smallest artifact whose metric is ``>= F`` (and
whose bytes fit): budget, format and structure family at once, dense-quantized points
included; with ``artifact`` it is written there (kept from the sweep when it was
measured in this call, else rebuilt and evaluated again).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lyoncompress.checkpoint import tensor_bytes
from lyoncompress.data import load_samples
from lyoncompress.errors import InputError
from lyoncompress.evaluation import evaluate
from lyoncompress.factorization.budget_search import gated_metric
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.frontier_claims import claim, locked, release
from lyoncompress.processes import owned_scratch_folder
from lyoncompress.quantization.formats import get_format
from lyoncompress.quantization.pipeline import INTEGER_FORMATS, default_rescale, quantize
from lyoncompress.recipe import (
    DEFAULT_EVAL_SAMPLES,
    SEARCH_METRICS,
    EvalConfig,
    QuantizeConfig,
    Recipe,
    SearchConfig,
    parse_size,
)
from lyoncompress.report import plot_frontier
from lyoncompress.structures import get_structure

FRONTIER_VERSION = 1
SCRATCH = ".frontier-scratch-"  # + the pid of the call that works in it
Progress = Callable[[str, int, int], None]  # (point label, done, total)


@dataclass(frozen=True)
class FrontierConfig:
    """What ``frontier`` measures.

    Attributes:
        task: evaluation task gated on (a key of ``SEARCH_METRICS``); None: the model
            kind's recovery task, as for the budget search.
        data: held-out evaluation data (as ``eval --data``); None: the built-in
            evaluation split, disjoint from the built-in calibration text.
        samples: samples drawn (seeded) from the data.
        structures: structures (``structures.STRUCTURES``) to factorize with.
        budgets: global budgets (fractions of the factorized layers' parameters).
        formats: storage formats of every point, dense and factorized.
        group_size: int4 entries per scale of the dense baselines (their rows admit it;
            factorized int4 keeps a scale per block row, since low ranks admit no group).
        include_dense: plain weights quantized with every point (``--include-dense``).
    """

    task: str | None = None
    data: str | Path | None = None
    samples: int = DEFAULT_EVAL_SAMPLES
    structures: tuple[str, ...] = ("lowrank", "monarch", "butterfly")
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    formats: tuple[str, ...] = ("fp16", "int8", "int4")
    group_size: int | None = 64
    include_dense: tuple[str, ...] = ("re:.*",)

    def __post_init__(self) -> None:
        for name in self.structures:
            get_structure(name)
        for fmt in self.formats:
            get_format(fmt)
        for budget in self.budgets:
            if not 0.0 < budget < 1.0:
                raise InputError(f"--budget {budget} must be a fraction in (0, 1), e.g. 0.5")
        if not (self.structures and self.budgets and self.formats):
            raise InputError("frontier needs at least one structure, budget and format")
        if self.samples < 1:
            raise InputError(f"--samples must be >= 1, got {self.samples}")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"--group-size must be >= 1, got {self.group_size}")
        QuantizeConfig(include_dense=self.include_dense)  # validates the patterns


@dataclass(frozen=True)
class FrontierSearch:
    """The gate of the search over formats.

    Attributes:
        min_recovery: the metric must be ``>= min_recovery`` (in (0, 1]).
        max_bytes: largest tensor data of the chosen artifact (e.g. ``20MB``); None: no limit.
    """

    min_recovery: float
    max_bytes: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.min_recovery <= 1.0:
            raise InputError(f"--min-recovery {self.min_recovery} must be in (0, 1], e.g. 0.99")
        if self.max_bytes is not None:
            _size(self.max_bytes)

    @property
    def limit(self) -> int | None:
        """``max_bytes`` in bytes (None: no limit)."""
        return None if self.max_bytes is None else _size(self.max_bytes)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InputError:
        raise InputError(f"--max-bytes {text!r} is not a size like 40MB or 512KiB") from None


@dataclass(frozen=True)
class Point:
    """One measured artifact (or the reference itself)."""

    label: str
    kind: str  # "reference" | "dense" | "factorized"
    format: str | None
    rescale: str | None
    group_size: int | None
    structure: str | None
    budget: float | None
    bytes: int
    file_bytes: int
    metric: float
    params_ratio: float | None = None
    seconds: float = 0.0
    pareto: bool = False


@dataclass(frozen=True)
class _Job:
    """A point to measure: the quantize options, and the factorized source if any."""

    label: str
    quantize: QuantizeConfig
    structure: str | None = None
    budget: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def file_bytes(path: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files (headers included); 0 for other formats."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files if f.suffix == ".safetensors")


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For ``(size, metric)`` pairs, whether each is Pareto-optimal: no other pair has a
    size ``<=`` and a metric ``>=``, one of them strictly (equal pairs are both optimal)."""
    best_below = -math.inf  # the best metric of every strictly smaller size seen so far
    flags = [False] * len(points)
    order = sorted(range(len(points)), key=lambda i: points[i][0])
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and points[order[end]][0] == points[order[start]][0]:
            end += 1
        same_size = order[start:end]
        top = max(points[i][1] for i in same_size)
        for i in same_size:
            flags[i] = points[i][1] == top and top > best_below
        best_below = max(best_below, top)
        start = end
    return flags


def verdict(points: list[Point]) -> dict[str, Any]:
    """Whether factorizing paid: the factorized points strictly better than every
    dense-quantized point of equal or larger size, and for the others the smallest
    dense-quantized point that is at least as good and no larger."""
    dense = [p for p in points if p.kind == "dense"]
    wins, beaten, unmatched = [], {}, []
    for point in (p for p in points if p.kind == "factorized"):
        rivals = [d for d in dense if d.bytes >= point.bytes]
        better = [d for d in dense if d.bytes <= point.bytes and d.metric >= point.metric]
        if rivals and all(point.metric > d.metric for d in rivals):
            wins.append(point.label)
        elif not rivals:
            unmatched.append(point.label)
        if better:
            beaten[point.label] = min(better, key=lambda d: d.bytes).label
    return {
        "factorized_wins": wins,
        "no_dense_point_as_large": unmatched,
        "dominated_by_dense": beaten,
        "pareto": [p.label for p in points if p.pareto],
    }


def choose(points: list[Point], search: FrontierSearch) -> dict[str, Any]:
    """The smallest measured artifact that passes ``search`` (ties: the better metric, then
    the label); the float reference is no candidate. Returns the report's ``search``
    section: ``chosen`` (a label or None), its fields, ``dense_won``, the ``passing``
    labels by size, ``smallest_passing_bytes`` and ``too_large`` (points pass, none fits)."""
    limit = search.limit
    passing = sorted(
        (p for p in points if p.kind != "reference" and p.metric >= search.min_recovery),
        key=lambda p: (p.bytes, -p.metric, p.label),
    )
    fitting = [p for p in passing if limit is None or p.bytes <= limit]
    chosen = fitting[0] if fitting else None
    section: dict[str, Any] = {
        "min_recovery": search.min_recovery,
        "max_bytes": limit,
        "passing": [p.label for p in passing],
        "smallest_passing_bytes": passing[0].bytes if passing else None,
        "too_large": bool(passing) and chosen is None,
        "passed": chosen is not None,
        "chosen": None if chosen is None else chosen.label,
        "dense_won": chosen is not None and chosen.kind == "dense",
    }
    if chosen is not None:
        section.update(
            {k: getattr(chosen, k) for k in ("kind", "structure", "budget", "format", "rescale")},
            group_size=chosen.group_size,
            bytes=chosen.bytes,
            metric=chosen.metric,
        )
    return section


def frontier(
    checkpoint: str | Path,
    out: str | Path,
    config: FrontierConfig | None = None,
    recipe: Recipe | None = None,
    plot: bool = True,
    progress: Progress | None = None,
    search: FrontierSearch | None = None,
    artifact: str | Path | None = None,
    factorized: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Measure the gated metric against whole-artifact bytes; write ``OUT/frontier.json``
    (and ``OUT/frontier.png`` with ``plot``).

    Args:
        checkpoint: a runnable model folder (a ``config.json`` with ``model_type``).
        out: folder for the report; points already in its ``frontier.json`` with the
            same settings are reused, others measured and added.
        config: what to measure (default ``FrontierConfig()``).
        recipe: every factorize option but ``method`` and ``budget`` (e.g. ``calib``,
            ``targets``); default ``Recipe()``.
        plot: draw the curve (needs the ``plot`` extra).
        progress: called after each point with (label, done, total).
        search: pick the smallest passing point (``choose``) over every point of the
            report, earlier parts' included; adds a ``search`` section.
        artifact: write the chosen point there (needs ``search``; must not exist). It is
            the very artifact measured when this call measured it; else it is rebuilt
            (factorize + quantize) and evaluated again (``artifact_metric``).
        factorized: folders written by ``factorize`` to use instead of factorizing again
            (``--factorized``): each serves the points of its structure and budget; it
            must come from ``checkpoint`` with ``recipe``'s options (its ``report.json``
            says so), and is read, never changed.

    Returns:
        ``{"settings", "points", "verdict", "seconds"}`` (and ``search``); each point has
        ``bytes``, ``metric`` and ``pareto``.

    Example:
        >>> report = frontier("model/", "rd/", FrontierConfig(formats=("int8",)))
        >>> report["verdict"]["factorized_wins"]
        []
    """
    config = config or FrontierConfig()
    recipe = recipe or Recipe()
    checkpoint, out = Path(checkpoint), Path(out)
    if artifact is not None:
        artifact = Path(artifact)
        if search is None:
            raise InputError("--artifact writes the point chosen by the search; add --min-recovery F")
        if artifact.exists():
            raise InputError(f"--artifact {artifact} exists; remove it or choose another folder")
    given = _given_factorized(checkpoint, recipe, factorized)
    gate = SearchConfig(min_recovery=1.0, task=config.task, data=config.data, samples=config.samples)
    task, metric = gated_metric(checkpoint, gate)
    if config.data is not None:
        load_samples(config.data, config.samples, 0)  # a bad data file fails before any work
    settings = {
        "version": FRONTIER_VERSION,
        "checkpoint": str(checkpoint.resolve()),
        "task": task,
        "metric": metric,
        "data": None if config.data is None else str(Path(config.data).resolve()),
        "samples": config.samples,
        "include_dense": list(config.include_dense),
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("method", "budget")},
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists: as read back from the file
    known = _known_points(out / "frontier.json", settings)
    started = time.perf_counter()
    eval_config = EvalConfig(tasks=(task,), data=config.data, samples=config.samples)
    jobs = _jobs(config)
    reference = Point(
        "dense float (reference)", "reference", None, None, None, None, None,
        tensor_bytes(checkpoint), file_bytes(checkpoint), 1.0,
    )  # fmt: skip
    measured = dict(known)  # points of earlier parts stay in the report
    out.mkdir(parents=True, exist_ok=True)
    stage = owned_scratch_folder(out, SCRATCH)  # those of killed calls are removed
    kept: Point | None = None  # the smallest passing point measured in this call, on disk
    try:
        made: dict[tuple[str, float], tuple[Path, float]] = {}  # factorized here, in the scratch
        for done, job in enumerate(jobs, 1):
            if _take(out, settings, job, measured):
                begin = time.perf_counter()
                source, ratio = checkpoint, None
                if job.structure is not None:
                    key = (job.structure, job.budget)
                    if key not in made and key not in given:
                        for folder, _ in made.values():  # its formats are all measured
                            shutil.rmtree(folder)
                        made.clear()
                        folder = stage / f"fact-{done}"
                        report = factorize(checkpoint, folder, recipe.replace(method=key[0], budget=key[1]))
                        made[key] = (folder, report["totals"]["ratio"])
                    source, ratio = given[key] if key in given else made[key]
                target = stage / f"point-{done}"
                quantize(source, target, job.quantize)
                value = float(evaluate(target, checkpoint, eval_config)["tasks"][task][metric])
                q = job.quantize
                measured[job.label] = Point(
                    label=job.label,
                    kind="dense" if job.structure is None else "factorized",
                    format=q.format,
                    rescale=q.rescale or default_rescale(q.format),
                    group_size=q.group_size,
                    structure=job.structure,
                    budget=job.budget,
                    bytes=tensor_bytes(target),
                    file_bytes=file_bytes(target),
                    metric=value,
                    params_ratio=ratio,
                    seconds=round(time.perf_counter() - begin, 3),
                )
                point = measured[job.label]
                if artifact is not None and _better(point, kept, search):
                    shutil.rmtree(stage / "best", ignore_errors=True)
                    target.rename(stage / "best")
                    kept = point
                else:
                    shutil.rmtree(target)
                # written after every point: an interrupted sweep resumes where it stopped
                _write(out, settings, reference, measured, started)
            if progress is not None:
                progress(job.label, done, len(jobs))
        for folder, _ in made.values():
            shutil.rmtree(folder)
        section = None
        if search is not None:
            _write(out, settings, reference, measured, started)  # gains the points of parts run alongside
            section = choose(list(measured.values()), search)
            section["artifact"] = None
            if artifact is not None and section["chosen"] is not None:
                chosen = measured[section["chosen"]]
                if kept is not None and kept.label == chosen.label:
                    shutil.move(str(stage / "best"), str(artifact))
                    section.update(artifact_metric=chosen.metric, rebuilt=False)
                else:
                    value = _build(checkpoint, chosen, config, recipe, stage, artifact, eval_config, given)
                    section.update(artifact_metric=value, rebuilt=True)
                section.update(artifact=str(artifact), artifact_bytes=tensor_bytes(artifact))
                section["artifact_passed"] = section["artifact_metric"] >= search.min_recovery
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        release(out)
    document = _write(out, settings, reference, measured, started, section)
    if plot:
        plot_frontier(document, out / "frontier.png")
    return document


def _better(point: Point, kept: Point | None, search: FrontierSearch | None) -> bool:
    """Whether ``point`` passes ``search`` and is a better choice than ``kept``."""
    assert search is not None
    limit = search.limit
    if point.metric < search.min_recovery or (limit is not None and point.bytes > limit):
        return False
    return kept is None or (point.bytes, -point.metric, point.label) < (kept.bytes, -kept.metric, kept.label)


def _build(
    checkpoint: Path,
    point: Point,
    config: FrontierConfig,
    recipe: Recipe,
    stage: Path,
    artifact: Path,
    eval_config: EvalConfig,
    given: dict[tuple[str, float], tuple[Path, float]],
) -> float:
    """Rebuild a point measured by an earlier part into ``artifact``; its metric, evaluated again."""
    options = QuantizeConfig(
        format=point.format,
        rescale=point.rescale,
        group_size=point.group_size,
        dense=point.kind == "dense",
        include_dense=config.include_dense,
    )
    source = checkpoint
    if point.kind == "factorized" and (point.structure, point.budget) in given:
        source = given[point.structure, point.budget][0]
    elif point.kind == "factorized":
        source = stage / "rebuild"
        factorize(checkpoint, source, recipe.replace(method=point.structure, budget=point.budget))
    quantize(source, artifact, options)
    (task,) = eval_config.tasks
    return float(evaluate(artifact, checkpoint, eval_config)["tasks"][task][SEARCH_METRICS[task]])


# options that do not change the factors (where they are computed, how the file is cut)
_NEUTRAL_OPTIONS = ("device", "stream", "max_shard_size")


def _given_factorized(
    checkpoint: Path, recipe: Recipe, folders: Sequence[str | Path]
) -> dict[tuple[str, float], tuple[Path, float]]:
    """``--factorized`` folders by (structure, budget), with their parameter ratio, after
    checking that each was factorized from ``checkpoint`` with ``recipe``'s options."""
    given: dict[tuple[str, float], tuple[Path, float]] = {}
    for folder in map(Path, folders):
        try:
            report = json.loads((folder / "report.json").read_text())
            options, source = report["recipe"], report["source"]
        except (OSError, ValueError, KeyError):
            raise InputError(
                f"--factorized {folder}: not a folder written by factorize (no report.json)"
            ) from None
        if report.get("command") != "factorize":
            raise InputError(f"--factorized {folder}: written by {report.get('command')!r}, not by factorize")
        if Path(source).resolve() != checkpoint.resolve():
            raise InputError(f"--factorized {folder}: factorized from {source}, not from {checkpoint}")
        wanted = json.loads(
            json.dumps(recipe.replace(method=options["method"], budget=options["budget"]).to_dict())
        )
        differ = sorted(
            k
            for k in set(wanted) | set(options)
            if k not in _NEUTRAL_OPTIONS and wanted.get(k) != options.get(k)
        )
        if differ:
            shown = ", ".join(f"{k} {options.get(k)!r} (frontier: {wanted.get(k)!r})" for k in differ)
            raise InputError(f"--factorized {folder}: factorized with other options: {shown}")
        key = (options["method"], float(options["budget"]))
        if key in given:
            raise InputError(
                f"--factorized {folder}: {given[key][0]} is already {key[0]} at budget {key[1]:g}"
            )
        given[key] = (folder, float(report["totals"]["ratio"]))
    return given


def _jobs(config: FrontierConfig) -> list[_Job]:
    include = config.include_dense
    jobs = []
    for fmt in config.formats:
        integer = fmt in INTEGER_FORMATS
        group = config.group_size if fmt == "int4" else None
        for rescale in ("none", "feedback") if integer else ("none",):
            shown = {"none": "rtn"}.get(rescale, rescale)
            label = f"dense {fmt}" + (f" g{group}" if group else "") + (f" {shown}" if integer else "")
            options = QuantizeConfig(
                format=fmt, rescale=rescale, group_size=group, dense=True, include_dense=include
            )
            jobs.append(_Job(label, options))
    for structure in config.structures:
        for budget in config.budgets:
            for fmt in config.formats:
                label = f"{structure} {budget:g} {fmt}"
                # float formats round to nearest: an 11-bit significand leaves nothing for a
                # rescaling to win, and its search on a 1536-row factor takes gigabytes
                rescale = None if fmt in INTEGER_FORMATS else "none"
                options = QuantizeConfig(format=fmt, rescale=rescale, include_dense=include)
                jobs.append(_Job(label, options, structure, budget))
    return jobs


def _known_points(path: Path, settings: dict[str, Any]) -> dict[str, Point]:
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err}); remove it to start a new frontier") from err
    if document.get("settings") != settings:
        raise InputError(
            f"{path} was measured with other settings (checkpoint, task, data, samples, "
            "include_dense or factorize options); use another --out or remove it"
        )
    fields = Point.__dataclass_fields__
    return {
        p["label"]: Point(**{k: v for k, v in p.items() if k in fields})
        for p in document["points"]
        if p["kind"] != "reference"
    }


def _take(out: Path, settings: dict[str, Any], job: _Job, measured: dict[str, Point]) -> bool:
    """Whether this call measures ``job``: not measured yet (``measured`` gains the points
    other calls wrote meanwhile) and its unit not taken by another running call; if so,
    the unit is claimed for this call."""
    unit = job.label if job.structure is None else f"{job.structure} {job.budget:g}"
    with locked(out):
        for label, point in _known_points(out / "frontier.json", settings).items():
            measured.setdefault(label, point)
        if job.label in measured:
            return False
        return claim(out, unit)


def _write(
    out: Path,
    settings: dict[str, Any],
    reference: Point,
    measured: dict[str, Point],
    started: float,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``OUT/frontier.json``: the points of ``measured`` and, merged in first, the
    points other calls with the same settings wrote there meanwhile (``measured`` gains
    them, so the search and the plot see them too)."""
    with locked(out):
        on_disk = _known_points(out / "frontier.json", settings)
        for label, point in on_disk.items():
            measured.setdefault(label, point)
        order = [*on_disk, *(label for label in measured if label not in on_disk)]
        points = [reference, *(measured[label] for label in order)]
        flags = pareto_flags([(p.bytes, p.metric) for p in points])
        points = [Point(**{**asdict(p), "pareto": flag}) for p, flag in zip(points, flags)]
        document = {
            "command": "frontier",
            "settings": settings,
            "points": [asdict(p) for p in points],
            "verdict": verdict(points),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if search is not None:
            document["search"] = search
        staging = out / f".frontier.json.{os.getpid()}.tmp"
        staging.write_text(json.dumps(document, indent=2) + "\n")
        staging.replace(out / "frontier.json")
    return document
