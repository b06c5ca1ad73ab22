"""Recipes: every option of ``factorize`` as a strict, versioned, frozen dataclass.

A recipe is YAML (see ``configs/``). Unknown keys and wrong types are errors that
name the key and the file; a flag given on the command line wins over the recipe.

Layer selection: ``targets`` and ``ignore`` are regular expressions matched with
``re.fullmatch`` against *module* names (the tensor name without ``.weight``),
e.g. ``encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense``. An optional ``re:``
prefix is accepted and ignored, for recipes written for torchao / compressed-tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lyoncompress.errors import InputError

RECIPE_VERSION = 1
ALLOCATIONS = ("uniform", "sensitivity")


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
        calib_samples: input rows per layer captured for calibration.
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
    """

    version: int = RECIPE_VERSION
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    method: str = "auto"
    depth: int = 2
    budget: float = 0.5
    order: str = "left-to-right"
    calib: str | None = None
    calib_samples: int = 4096
    refine_steps: int = 300
    refine_sweeps: int = 0
    distill_steps: int = 0
    distill_lr: float | None = None
    sequential: bool = False
    permute: bool = False
    allocate: str = "uniform"
    max_shard_size: str = "5GB"
    layers: tuple[LayerOverride, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate(self, "recipe")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given)."""
        given = {k: v for k, v in changes.items() if v is not None and v != ()}
        return dataclasses.replace(self, **given)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.exists():
            raise InputError(f"recipe {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise InputError(f"recipe {path}: not valid YAML ({err})") from err
        return from_dict(data, str(path))

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
    "sequential": (bool,),
    "permute": (bool,),
    "allocate": (str,),
    "max_shard_size": (str,),
    "layers": (dict,),
}
_OVERRIDE_KEYS = {"method": (str,), "budget": (float, int), "depth": (int,)}


def from_dict(data: Any, where: str) -> Recipe:
    """Build a recipe from parsed YAML, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a recipe is a mapping of options, got {type(data).__name__}")
    for key, value in data.items():
        if key not in _TYPES:
            raise InputError(f"{where}: unknown key {key!r}; valid keys: {', '.join(_TYPES)}")
        if (isinstance(value, bool) and bool not in _TYPES[key]) or not isinstance(value, _TYPES[key]):
            expected = " or ".join(t.__name__ for t in _TYPES[key])
            raise InputError(f"{where}: key {key!r} must be {expected}, got {value!r}")
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
        if depth < 1:
            raise InputError(f"depth {depth} must be >= 1 (number of butterfly factors)")
    if recipe.calib_samples < 16:
        raise InputError(f"calib_samples {recipe.calib_samples} is too few; use 16 or more (default 4096)")
    if min(recipe.refine_steps, recipe.refine_sweeps, recipe.distill_steps) < 0:
        raise InputError("refine_steps, refine_sweeps and distill_steps must be >= 0")
    if recipe.distill_lr is not None and not recipe.distill_lr > 0:
        raise InputError(f"distill_lr {recipe.distill_lr} must be > 0")
    if recipe.distill_steps and not recipe.calib:
        raise InputError("distill_steps needs calibration data: add --calib builtin (or a data file)")
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


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", text.upper())
    if not match or int(float(match.group(1)) * _UNITS[match.group(2)]) < 1:
        raise InputError(f"max_shard_size {text!r} is not a size like 5GB, 200MB or 512KiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
