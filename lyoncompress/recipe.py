"""Recipes: the options of every verb as strict, versioned, frozen dataclasses.

A recipe is YAML (see ``configs/``). A *sectioned* recipe has the top-level keys
``version``, ``factorize`` (``Recipe``), ``quantize`` (``QuantizeConfig``), ``eval``
(``EvalConfig``) and ``search`` (``SearchConfig``, the budget search of ``factorize``),
each section optional; a *flat* recipe (every key a ``factorize`` option, as in
``configs/*.yaml``) is the ``factorize`` section alone. Unknown keys and wrong types are
errors that name the key and the file; a flag given on the command line wins over the
recipe.

Layer selection: ``targets`` and ``ignore`` are regular expressions matched with
``re.fullmatch`` against *module* names (the tensor name without ``.weight``),
e.g. ``encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense``. An optional ``re:``
prefix is accepted and ignored, for recipes written for torchao / compressed-tensors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lyoncompress.errors import InputError
from lyoncompress.schema import MAX_DEPTH

RECIPE_VERSION = 1
ALLOCATIONS = ("uniform", "sensitivity")
# where the calibrated steps run: ``auto`` is cuda when torch sees a GPU, else cpu
DEVICES = ("auto", "cpu", "cuda")
STREAMS = ("auto", "on", "off")
# Input rows per layer and per split (fitting, held out) captured from calibration data,
# by ``factorize`` and ``quantize`` alike.
DEFAULT_CALIB_SAMPLES = 4096
DEFAULT_EVAL_SAMPLES = 256  # samples drawn (seeded) from evaluation data
# Tasks the budget search can gate on -> the metric it compares with the target. All are
# "higher is better, 1.0 = the reference model".
SEARCH_METRICS: dict[str, str] = {
    "classification": "recovery",  # compressed accuracy / reference accuracy
    "embeddings": "recovery",  # mean cosine of sentence embeddings to the reference's
    "perplexity": "recovery",  # reference perplexity / compressed perplexity
    "outputs": "final_cosine",  # mean cosine of the final outputs (logits or pooled states)
}


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """Compile a layer-selection regex; a bad one is an ``InputError`` naming it."""
    body = pattern[3:] if pattern.startswith("re:") else pattern
    try:
        return re.compile(body)
    except re.error as err:
        raise InputError(f"{where}: invalid regular expression {pattern!r}: {err}") from err


@dataclass(frozen=True)
class LayerOverride:
    """Options for the layers whose module name fully matches ``pattern``."""

    pattern: str
    method: str | None = None
    budget: float | None = None
    depth: int | None = None


@dataclass(frozen=True)
class Recipe:
    """All options of ``factorize``.

    Attributes:
        version: recipe format version (1).
        targets: regexes of module names to compress; empty = every 2-D ``*.weight``
            except embeddings and output heads.
        ignore: regexes of module names to leave dense.
        method: ``auto`` or a structure of ``structures.STRUCTURES``.
        depth: number of factors of ``butterfly`` chains.
        budget: fraction of each layer's dense parameters the compressed layer may keep.
        order: projection order (``left-to-right`` carries the error guarantee).
        calib: calibration data for data-aware structure choice and refinement:
            ``builtin`` (offline defaults) or a data file; None: weight error only.
        calib_samples: input rows per layer captured for calibration (per split:
            as many again are held out).
        refine_steps: Adam steps of each layer-wise refinement.
        refine_sweeps: alternating least-squares sweeps of each layer-wise refinement
            (exact solves of the first and last factor), before the Adam steps. Off by
            default: on MiniLM 30 sweeps lower a hybrid's held-out error by ~2% but
            take 3x (384 inputs) to 11x (1536 inputs) the time of 100 Adam steps.
        distill_steps: Adam steps of end-to-end distillation of all factors on the
            calibration data after the layer-wise pass (0: none; needs ``calib``).
        distill_lr: Adam learning rate of the distillation (small: the factors start
            close to a good solution, and larger steps undo the layer-wise fit); None:
            the objective's default (2e-4, decayed to 0, for every layer's hidden
            states; 1e-4 for causal-LM logits; 5e-5 for final outputs).
        distill_objective: what the distillation matches, a name of
            ``refine.distill.OBJECTIVES`` (``layers-mse``, ``layers-embedding``,
            ``hidden-mse``, ``logits-kl``); None: the model's default
            (``refine.distill.default_objective``).
        distill_batch: sentences per distillation step for text models, the training
            text regrouped by length (0: the calibration batch, 16). On MiniLM (MLPs at
            50%) 32 beat 16 at 1000 steps (cosine 0.9575 against 0.9545), at twice the
            cost of a step.
        distill_select_steps: pick the whole-model start of the distillation by a short
            distillation of this many steps from each candidate (0: none; needs
            ``distill_steps`` and method ``auto``): the layer-wise choice, and for each
            structure family (low rank, Monarch, hybrid, ...) every layer's best fit of
            that family; each is scored on the calibration data's held-out batches, and
            the full distillation continues from the lowest.
        sequential: fit the layers in forward order, each on the inputs of the model
            whose earlier layers are already compressed, against the reference outputs
            (needs ``calib``; one calibration pass per layer).
        permute: search a hidden-unit order for each MLP pair (e.g. ``intermediate`` /
            ``output``) that brings both matrices closer to their structure, and fold
            it into the weights (the function is unchanged).
        allocate: ``uniform`` (every layer keeps ``budget`` of its parameters) or
            ``sensitivity`` (the same total, re-divided by each layer's measured effect
            on the final output; needs ``calib``).
        max_shard_size: largest artifact shard, e.g. ``5GB`` or ``200MB``.
        layers: per-layer overrides, first match wins.
        device: where the calibrated steps run (capture, structure fits, allocation,
            distillation): ``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``.
            Weight-only fits run on the CPU.
        stream: block-by-block calibration (``factorization.streaming``): ``auto``
            streams when the model is a repeated block list and neither sensitivity
            allocation nor end-to-end distillation needs the whole model; ``on``
            always streams (distillation is then block-wise) or refuses with the
            reason; ``off`` holds the whole reference model.
    """

    version: int = RECIPE_VERSION
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    method: str = "auto"
    depth: int = 2
    budget: float = 0.5
    order: str = "left-to-right"
    calib: str | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    refine_steps: int = 300
    refine_sweeps: int = 0
    distill_steps: int = 0
    distill_lr: float | None = None
    distill_objective: str | None = None
    distill_batch: int = 0
    distill_select_steps: int = 0
    sequential: bool = False
    permute: bool = False
    allocate: str = "uniform"
    max_shard_size: str = "5GB"
    layers: tuple[LayerOverride, ...] = field(default_factory=tuple)
    device: str = "auto"
    stream: str = "auto"

    def __post_init__(self) -> None:
        validate(self, "recipe")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given)."""
        given = {k: v for k, v in changes.items() if v is not None and v != ()}
        return dataclasses.replace(self, **given)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """The ``factorize`` options of a recipe file, flat or sectioned."""
        return load_recipe(path).factorize

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,),
    "targets": (list, tuple),
    "ignore": (list, tuple),
    "method": (str,),
    "depth": (int,),
    "budget": (float, int),
    "order": (str,),
    "calib": (str, type(None)),
    "calib_samples": (int,),
    "refine_steps": (int,),
    "refine_sweeps": (int,),
    "distill_steps": (int,),
    "distill_lr": (float, type(None)),
    "distill_objective": (str, type(None)),
    "distill_batch": (int,),
    "distill_select_steps": (int,),
    "sequential": (bool,),
    "permute": (bool,),
    "allocate": (str,),
    "max_shard_size": (str,),
    "layers": (dict,),
    "device": (str,),
    "stream": (str,),
}
_OVERRIDE_KEYS = {"method": (str,), "budget": (float, int), "depth": (int,)}


def from_dict(data: Any, where: str) -> Recipe:
    """Build a recipe from parsed YAML, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a recipe is a mapping of options, got {type(data).__name__}")
    _check_types(data, _TYPES, where)
    kwargs = dict(data)
    for key in ("targets", "ignore"):
        if key in kwargs:
            if not all(isinstance(p, str) for p in kwargs[key]):
                raise InputError(f"{where}: every entry of {key!r} must be a string")
            kwargs[key] = tuple(kwargs[key])
    if "layers" in kwargs:
        kwargs["layers"] = tuple(_override(p, o, where) for p, o in kwargs["layers"].items())
    if "budget" in kwargs:
        kwargs["budget"] = float(kwargs["budget"])
    try:
        return Recipe(**kwargs)
    except InputError as err:
        raise InputError(f"{where}: {err}") from err


def _check_types(data: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> None:
    for key, value in data.items():
        if key not in types:
            raise InputError(f"{where}: unknown key {key!r}; valid keys: {', '.join(types)}")
        if (isinstance(value, bool) and bool not in types[key]) or not isinstance(value, types[key]):
            expected = " or ".join(t.__name__ for t in types[key])
            raise InputError(f"{where}: key {key!r} must be {expected}, got {value!r}")


def _override(pattern: str, options: Any, where: str) -> LayerOverride:
    if not isinstance(options, dict):
        raise InputError(f"{where}: layers.{pattern} must be a mapping of options")
    for key, value in options.items():
        if key not in _OVERRIDE_KEYS:
            raise InputError(
                f"{where}: unknown key {key!r} in layers.{pattern}; valid: {', '.join(_OVERRIDE_KEYS)}"
            )
        if isinstance(value, bool) or not isinstance(value, _OVERRIDE_KEYS[key]):
            raise InputError(f"{where}: layers.{pattern}.{key} has the wrong type: {value!r}")
    budget = options.get("budget")
    return LayerOverride(
        pattern=pattern,
        method=options.get("method"),
        budget=float(budget) if budget is not None else None,
        depth=options.get("depth"),
    )


def validate(recipe: Recipe, where: str) -> None:
    """Range checks shared by YAML and CLI options; registries are checked by their owners."""
    if recipe.version != RECIPE_VERSION:
        raise InputError(f"version {recipe.version} is not supported; this lyoncompress reads version 1")
    budgets = [recipe.budget] + [o.budget for o in recipe.layers if o.budget is not None]
    for budget in budgets:
        if not 0.0 < budget < 1.0:
            raise InputError(f"budget {budget} must be a fraction in (0, 1), e.g. 0.5")
    depths = [recipe.depth] + [o.depth for o in recipe.layers if o.depth is not None]
    for depth in depths:
        if not 1 <= depth <= MAX_DEPTH:
            raise InputError(f"depth {depth} must be in 1 … {MAX_DEPTH} (number of butterfly factors)")
    if recipe.calib_samples < 16:
        raise InputError(
            f"calib_samples {recipe.calib_samples} is too few; "
            f"use 16 or more (default {DEFAULT_CALIB_SAMPLES})"
        )
    if min(recipe.refine_steps, recipe.refine_sweeps, recipe.distill_steps) < 0:
        raise InputError("refine_steps, refine_sweeps and distill_steps must be >= 0")
    if recipe.distill_lr is not None and not recipe.distill_lr > 0:
        raise InputError(f"distill_lr {recipe.distill_lr} must be > 0")
    if recipe.distill_steps and not recipe.calib:
        raise InputError("distill_steps needs calibration data: add --calib builtin (or a data file)")
    _check_objective(recipe)
    _check_batch(recipe)
    _check_select(recipe)
    if recipe.device not in DEVICES:
        raise InputError(f"device {recipe.device!r} is unknown; choose one of {', '.join(DEVICES)}")
    if recipe.stream not in STREAMS:
        raise InputError(f"stream {recipe.stream!r} is unknown; choose one of {', '.join(STREAMS)}")
    if recipe.allocate not in ALLOCATIONS:
        raise InputError(f"allocate {recipe.allocate!r} is unknown; choose one of {', '.join(ALLOCATIONS)}")
    for option, used in (
        ("sequential", recipe.sequential),
        ("allocate sensitivity", recipe.allocate != "uniform"),
    ):
        if used and not recipe.calib:
            raise InputError(f"{option} needs calibration data: add --calib builtin (or a data file)")
    for pattern in (*recipe.targets, *recipe.ignore, *(o.pattern for o in recipe.layers)):
        compile_pattern(pattern, where)
    parse_size(recipe.max_shard_size)


def _check_objective(recipe: Recipe) -> None:
    from lyoncompress.refine.distill import WHOLE_MODEL_OBJECTIVES

    name = recipe.distill_objective
    if name is None:
        return
    if name not in WHOLE_MODEL_OBJECTIVES:
        raise InputError(
            f"distill_objective {name!r} is unknown; choose one of {', '.join(WHOLE_MODEL_OBJECTIVES)}"
        )
    if recipe.stream == "on":
        raise InputError(
            f"distill_objective {name!r} is for whole-model distillation; --stream on distils block by "
            "block (block-mse): drop --distill-objective or use --stream auto or off"
        )


def _check_batch(recipe: Recipe) -> None:
    if recipe.distill_batch < 0:
        raise InputError(f"distill_batch {recipe.distill_batch} must be >= 0 (0: the calibration batch)")
    if recipe.distill_batch and recipe.stream == "on":
        raise InputError(
            "distill_batch is for whole-model distillation; --stream on distils block by block on "
            "the captured batches: drop --distill-batch or use --stream auto or off"
        )


def _check_select(recipe: Recipe) -> None:
    steps = recipe.distill_select_steps
    if steps < 0:
        raise InputError(f"distill_select_steps {steps} must be >= 0 (0: no selection)")
    if not steps:
        return
    if not recipe.distill_steps:
        raise InputError("distill_select_steps picks the start of a distillation: add --distill-steps N")
    if recipe.method != "auto":
        raise InputError(
            f"distill_select_steps chooses among auto's structure families; method {recipe.method!r} "
            "has one: drop --distill-select-steps or use --method auto"
        )
    if recipe.stream == "on":
        raise InputError(
            "distill_select_steps compares whole-model distillations; --stream on distils block by "
            "block: use --stream auto or off"
        )


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", text.upper())
    if not match or int(float(match.group(1)) * _UNITS[match.group(2)]) < 1:
        raise InputError(f"max_shard_size {text!r} is not a size like 5GB, 200MB or 512KiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _replaced(config: Any, changes: dict[str, Any]) -> Any:
    """``dataclasses.replace`` with the ``None`` (flag not given) values left out."""
    given = {k: v for k, v in changes.items() if v is not None and v != ()}
    return dataclasses.replace(config, **given)


@dataclass(frozen=True)
class QuantizeConfig:
    """All options of ``quantize``.

    Attributes:
        format: a name from ``quantization.FORMATS``: ``int8``, ``int4``, ``fp8-e4m3``,
            ``fp8-e5m2``, ``bf16``, ``fp16``, ``float:tN``.
        rescale: a name from ``quantization.RESCALINGS``; None: ``left-to-right``, for
            integer formats ``equalize+auto`` (``auto`` with ``calib``).
        group_size: one scale per this many entries along a block row; None: per row.
        dense: quantize the plain weights of a checkpoint that was not factorized (every
            2-D ``*.weight`` except embeddings and output heads, as ``factorize`` selects).
        include_dense: regexes (``re.fullmatch`` on module names, optional ``re:`` prefix)
            of plain 2-D weights to quantize as well: the Linear layers a factorized
            artifact left dense (structure ``dense``) and embedding tables (structure
            ``embedding``); e.g. ``re:.*`` quantizes every weight of the model. A pattern
            that matches no plain weight is a warning; a match that is neither an
            ``nn.Linear`` nor an ``nn.Embedding`` an error.
        calib: calibration data (``builtin`` or a file as ``eval --data`` takes); each
            layer's rescaling then minimises its output error on the captured inputs.
        calib_samples: input rows per layer to fit on (as many are held out); the same
            default as ``Recipe.calib_samples``.
        distill_steps: Adam steps of quantization-aware distillation after the analytic
            quantization (0: none; needs ``calib`` and ``int8`` / ``int4``): the latent
            weights and their scales are trained end to end through the quantizer
            (straight-through rounding, LSQ scale gradients) against the teacher's
            outputs; the best held-out state is re-quantized to the stored codes.
        distill_lr: its Adam learning rate; None: the objective's default (as
            ``factorize``'s ``distill_lr``).
        max_shard_size: largest artifact shard, e.g. ``5GB``.
    """

    format: str = "int8"
    rescale: str | None = None
    group_size: int | None = None
    dense: bool = False
    include_dense: tuple[str, ...] = ()
    calib: str | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    distill_steps: int = 0
    distill_lr: float | None = None
    max_shard_size: str = "5GB"

    def __post_init__(self) -> None:
        if not isinstance(self.include_dense, tuple) or not all(
            isinstance(p, str) for p in self.include_dense
        ):
            raise InputError(f"include_dense must be a list of regexes, got {self.include_dense!r}")
        for pattern in self.include_dense:
            compile_pattern(pattern, "--include-dense")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"--group-size must be >= 1, got {self.group_size}")
        if self.calib_samples < 1:
            raise InputError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib is not None and self.dense:
            raise InputError("--calib needs a factorized artifact; drop --dense or --calib")
        if self.distill_steps < 0:
            raise InputError(f"--distill-steps must be >= 0, got {self.distill_steps}")
        if self.distill_lr is not None and not self.distill_lr > 0:
            raise InputError(f"--distill-lr must be > 0, got {self.distill_lr}")
        if self.distill_steps and self.calib is None:
            raise InputError("--distill-steps needs calibration data: add --calib builtin (or a data file)")
        parse_size(self.max_shard_size)

    def replace(self, **changes: Any) -> QuantizeConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given)."""
        return _replaced(self, changes)


@dataclass(frozen=True)
class Gates:
    """Thresholds of ``evaluate``; None disables a gate.

    Attributes:
        min_recovery: lowest acceptable recovery (classification accuracy ratio,
            embedding cosine, perplexity ratio).
        max_output_error: highest acceptable relative error of the final outputs.
    """

    min_recovery: float | None = None
    max_output_error: float | None = None

    def __post_init__(self) -> None:
        # recoveries are ratios to the reference: a gate above 1 could never be met by design
        if self.min_recovery is not None and not 0 < self.min_recovery <= 1:
            raise InputError(f"--min-recovery must be in (0, 1], got {self.min_recovery}")
        if self.max_output_error is not None and not 0 <= self.max_output_error < math.inf:
            raise InputError(f"--max-output-error must be a finite number >= 0, got {self.max_output_error}")


@dataclass(frozen=True)
class EvalConfig:
    """All options of ``evaluate``.

    Attributes:
        tasks: names from ``evaluation.TASKS``; empty: every task that fits the model.
        data: evaluation data (text, .npy, .npz, .safetensors); None: built-in data.
        samples: how many samples to draw (seeded) from the data.
        seed: the seed of that draw.
        gates: thresholds; the report's ``passed`` is False when one fails.
    """

    tasks: tuple[str, ...] = ()
    data: str | Path | None = None
    samples: int = DEFAULT_EVAL_SAMPLES
    seed: int = 0
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise InputError(f"--samples must be >= 1, got {self.samples}")

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given).
        ``min_recovery`` and ``max_output_error`` replace the gates'."""
        gates = {k: changes.pop(k) for k in ("min_recovery", "max_output_error") if k in changes}
        config = _replaced(self, changes)
        if any(v is not None for v in gates.values()):
            config = dataclasses.replace(config, gates=_replaced(config.gates, gates))
        return config


@dataclass(frozen=True)
class SearchConfig:
    """Options of the budget search of ``factorize``; validated at construction.

    Attributes:
        min_recovery: target F in (0, 1]: the metric must be >= F.
        task: evaluation task to gate on (a key of ``SEARCH_METRICS``); None: the
            model kind's default (``budget_search.DEFAULT_TASKS``).
        data: evaluation data file (as ``eval --data``); None: built-in data.
        samples: samples drawn (seeded) from the data.
        low: budgets at or below ``low`` are not searched; ``low`` itself is tried.
        high: largest budget tried, first; if it fails, the target is unreachable.
        tolerance: stop when the smallest passing and largest failing budgets are
            this close (absolute budget).
        max_steps: most factorize + evaluate rounds, the two bounds included.
        max_bytes: largest tensor data of the written artifact (e.g. ``40MB``); the
            smallest passing budget gives the smallest artifact, so when it is larger
            no budget meets both and nothing is written. None: no size limit.
    """

    min_recovery: float
    task: str | None = None
    data: str | Path | None = None
    samples: int = DEFAULT_EVAL_SAMPLES
    low: float = 0.02
    high: float = 0.95  # a recipe budget must be < 1 (a budget of 1 compresses nothing)
    tolerance: float = 0.01
    max_steps: int = 12
    max_bytes: str | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None:
            try:
                parse_size(self.max_bytes)
            except InputError:
                raise InputError(
                    f"--max-bytes {self.max_bytes!r} is not a size like 40MB or 512KiB"
                ) from None
        if not 0.0 < self.min_recovery <= 1.0:
            raise InputError(f"--min-recovery {self.min_recovery} must be in (0, 1], e.g. 0.99")
        if not 0.0 < self.low < self.high < 1.0:
            raise InputError(
                f"search bounds must satisfy 0 < --min-budget < --max-budget < 1; "
                f"got {self.low} and {self.high}"
            )
        if not self.tolerance > 0:
            raise InputError(f"--search-tolerance {self.tolerance} must be > 0, e.g. 0.01")
        if self.max_steps < 2:
            raise InputError(f"--search-steps {self.max_steps} must be >= 2 (the two bounds)")
        if self.samples < 1:
            raise InputError(f"samples must be >= 1, got {self.samples}")
        if self.task is not None and self.task not in SEARCH_METRICS:
            raise InputError(
                f"--eval-task {self.task!r} has no recovery metric to search on; "
                f"choose one of {', '.join(SEARCH_METRICS)}"
            )

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given)."""
        return _replaced(self, changes)


@dataclass(frozen=True)
class RecipeFile:
    """Every section of a recipe file; a section the file leaves out has its defaults.

    Attributes:
        version: recipe format version (1).
        factorize: options of ``factorize``.
        quantize: options of ``quantize``.
        eval: options of ``evaluate``.
        search: the budget search of ``factorize``; None: no search (a fixed budget).
    """

    version: int = RECIPE_VERSION
    factorize: Recipe = field(default_factory=Recipe)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig | None = None


SECTIONS = ("factorize", "quantize", "eval", "search")
_NUMBER = (float, int)
_QUANTIZE_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "rescale": (str, type(None)),
    "group_size": (int, type(None)),
    "dense": (bool,),
    "include_dense": (list, tuple),
    "calib": (str, type(None)),
    "calib_samples": (int,),
    "distill_steps": (int,),
    "distill_lr": (float, type(None)),
    "max_shard_size": (str,),
}
_EVAL_TYPES: dict[str, tuple[type, ...]] = {
    "tasks": (list, tuple),
    "data": (str, type(None)),
    "samples": (int,),
    "seed": (int,),
    "gates": (dict,),
}
_GATES_TYPES: dict[str, tuple[type, ...]] = {
    "min_recovery": (float, int, type(None)),
    "max_output_error": (float, int, type(None)),
}
_SEARCH_TYPES: dict[str, tuple[type, ...]] = {
    "min_recovery": _NUMBER,
    "task": (str, type(None)),
    "data": (str, type(None)),
    "samples": (int,),
    "low": _NUMBER,
    "high": _NUMBER,
    "tolerance": _NUMBER,
    "max_steps": (int,),
    "max_bytes": (str, type(None)),
}


def load_recipe(path: str | Path) -> RecipeFile:
    """Read a recipe file, flat (the ``factorize`` section alone) or sectioned.

    Args:
        path: a YAML file such as ``configs/demo.yaml``.

    Returns:
        Every section; those the file leaves out have their defaults.

    Example:
        >>> load_recipe("configs/demo.yaml").factorize.targets
        ('fc1', 'fc2')
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as err:
        raise InputError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise InputError(f"recipe {path}: not valid YAML ({_yaml_problem(err)})") from err
    return recipe_from_dict(data, str(path))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def recipe_from_dict(data: Any, where: str) -> RecipeFile:
    """Build every section from parsed YAML; a mapping without section keys is flat."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a recipe is a mapping of options, got {type(data).__name__}")
    if not any(key in SECTIONS for key in data):
        return RecipeFile(factorize=from_dict(data, where))
    valid = ("version", *SECTIONS)
    for key, value in data.items():
        if key not in valid:
            raise InputError(
                f"{where}: unknown key {key!r}; a recipe with sections has the keys {', '.join(valid)}"
            )
        if key != "version" and not isinstance(value, dict):
            raise InputError(f"{where}: section {key!r} must be a mapping of options, got {value!r}")
    version = data.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(f"{where}: key 'version' must be int, got {version!r}")
    factorize = data.get("factorize", {})
    if "version" in factorize:
        raise InputError(f"{where}: factorize.version: a recipe with sections has one top-level version")
    search = data.get("search")
    return RecipeFile(
        version=version,
        factorize=from_dict({"version": version, **factorize}, where),
        quantize=_section(QuantizeConfig, data.get("quantize", {}), _QUANTIZE_TYPES, f"{where}: quantize"),
        eval=_eval_section(data.get("eval", {}), f"{where}: eval"),
        search=None if search is None else _search_section(search, f"{where}: search"),
    )


def _section(cls: type, data: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> Any:
    _check_types(data, types, where)
    kwargs = {k: float(v) if types[k] == _NUMBER else v for k, v in data.items()}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return cls(**kwargs)
    except InputError as err:
        raise InputError(f"{where}: {err}") from err


def _eval_section(data: dict[str, Any], where: str) -> EvalConfig:
    _check_types(data, _EVAL_TYPES, where)
    kwargs = dict(data)
    if "tasks" in kwargs:
        if not all(isinstance(task, str) for task in kwargs["tasks"]):
            raise InputError(f"{where}: every entry of 'tasks' must be a string")
        kwargs["tasks"] = tuple(kwargs["tasks"])
    if "gates" in kwargs:
        gates = kwargs["gates"]
        _check_types(gates, _GATES_TYPES, f"{where}: gates")
        kwargs["gates"] = Gates(**{k: None if v is None else float(v) for k, v in gates.items()})
    try:
        return EvalConfig(**kwargs)
    except InputError as err:
        raise InputError(f"{where}: {err}") from err


def _search_section(data: dict[str, Any], where: str) -> SearchConfig:
    if "min_recovery" not in data:
        raise InputError(f"{where}: 'min_recovery' is required (the recovery the search must keep)")
    return _section(SearchConfig, data, _SEARCH_TYPES, where)
