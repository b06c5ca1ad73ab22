"""Choose which layers to compress and with which options: checkpoint + recipe -> plan."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lyoncompress.checkpoint import Checkpoint
from lyoncompress.errors import InputError
from lyoncompress.output import QUANT_METHOD
from lyoncompress.recipe import Recipe, compile_pattern

# Default selection leaves these dense: embeddings and output heads are lookup
# tables or tiny, and compressing them costs accuracy for little gain.
DEFAULT_EXCLUDE = re.compile(r".*(embed|embedding|embeddings|wte|wpe|lm_head|head|classifier|pooler).*")


@dataclass(frozen=True)
class LayerPlan:
    """One layer to compress: module ``name`` with tensors ``name.weight`` (+ ``name.bias``)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    has_bias: bool
    method: str
    budget: float
    depth: int

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"

    @property
    def max_params(self) -> int:
        return int(self.budget * self.shape[0] * self.shape[1])


@dataclass(frozen=True)
class Plan:
    layers: list[LayerPlan]
    warnings: list[str]


def make_plan(checkpoint: Checkpoint, recipe: Recipe) -> Plan:
    """Select layers by ``recipe.targets`` / ``recipe.ignore`` and attach their options.

    Raises ``InputError`` when nothing is selected or ``checkpoint`` is a lyoncompress
    artifact; patterns that match no layer are reported in ``Plan.warnings``.
    """
    quantization = (checkpoint.config or {}).get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        # its compressed layers have no .weight to select, yet their factors would be copied
        # through without their records: an artifact that loads nowhere
        raise InputError(
            f"{checkpoint.path} is a lyoncompress artifact; "
            "factorize takes the dense checkpoint it was made from"
        )
    matrices = {
        name[: -len(".weight")]: info
        for name, info in checkpoint.infos.items()
        if name.endswith(".weight") and len(info.shape) == 2
    }
    # integer or boolean weights (already quantized, or index tables) are no matrices
    # to factorize or re-quantize: they pass through unchanged, and the plan says so
    candidates = {name: info for name, info in matrices.items() if info.dtype.is_floating_point}
    not_float = sorted(set(matrices) - set(candidates))
    targets = [(p, compile_pattern(p, "--target")) for p in recipe.targets]
    ignores = [(p, compile_pattern(p, "--ignore")) for p in recipe.ignore]
    overrides = [(o, compile_pattern(o.pattern, f"layers.{o.pattern}")) for o in recipe.layers]
    used: set[str] = set()

    def matches(name: str, patterns: list) -> bool:
        hit = False
        for pattern, regex in patterns:
            if regex.fullmatch(name):
                used.add(pattern)
                hit = True
        return hit

    layers = []
    for name, info in candidates.items():
        selected = matches(name, targets) if targets else not DEFAULT_EXCLUDE.fullmatch(name)
        if not selected or matches(name, ignores):
            continue
        override = next((o for o, regex in overrides if regex.fullmatch(name)), None)
        if override is not None:
            used.add(override.pattern)
        layers.append(
            LayerPlan(
                name=name,
                shape=(info.shape[0], info.shape[1]),
                has_bias=f"{name}.bias" in checkpoint.infos,
                method=(override and override.method) or recipe.method,
                budget=(override and override.budget) or recipe.budget,
                depth=(override and override.depth) or recipe.depth,
            )
        )
    warnings = [
        f"pattern {p!r} matched no 2-D weight"
        for p in (*recipe.targets, *recipe.ignore, *(o.pattern for o in recipe.layers))
        if p not in used
    ]
    if not_float:
        shown = ", ".join(not_float[:3]) + (" …" if len(not_float) > 3 else "")
        warnings.append(f"{len(not_float)} non-float 2-D weight(s) left unchanged: {shown}")
    if not layers:
        found = ", ".join(list(candidates)[:6]) or "none"
        if not_float and not candidates:
            found += f"; {len(not_float)} non-float ones, which are never compressed"
        raise InputError(
            f"{checkpoint.path}: no layer selected for compression "
            f"(2-D float weights found: {found}); check --target/--ignore"
        )
    return Plan(layers=layers, warnings=warnings)
