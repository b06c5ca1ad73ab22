"""Hidden-unit permutations of MLP pairs, folded into the weights before factorizing.

In ``y = W2 σ(W1 x + b1) + b2`` reordering the hidden units (rows of ``W1`` and
``b1``, columns of ``W2``) leaves the function unchanged but can bring both
matrices much closer to a Kronecker-sparse structure
(``refine.permutation.search_permutation``). The order found is applied to the
checkpoint's tensors as they are read, so the artifact simply holds the permuted
MLP: same tensor names and shapes, no index tensor, nothing extra to load.

Pairs are recognised by module names (both layers must be compression targets):
``*.intermediate.dense -> *.output.dense`` (BERT-style encoders),
``*.mlp.up_proj -> *.mlp.down_proj`` with ``*.mlp.gate_proj`` permuted alongside
(Llama-style gated MLPs), and ``*fc1 -> *fc2``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain
from lyoncompress.checkpoint import Checkpoint
from lyoncompress.errors import InputError
from lyoncompress.factorization.methods import fit_weight, prepared_weight
from lyoncompress.plan import LayerPlan, Plan
from lyoncompress.refine.permutation import search_permutation
from lyoncompress.structures import AUTO, STRUCTURES

SEARCH_PAIRS = 2  # candidate chain pairs searched besides the ones chosen unpermuted
# (first layer, second layer, siblings of the first that produce the same hidden units)
PAIR_RULES: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (re.compile(r"(.*)\.intermediate\.dense"), r"\1.output.dense", ()),
    (re.compile(r"(.*)\.mlp\.up_proj"), r"\1.mlp.down_proj", (r"\1.mlp.gate_proj",)),
    (re.compile(r"(.*)fc1"), r"\1fc2", ()),
)


@dataclass(frozen=True)
class MLPPair:
    """Two compressed layers around an elementwise activation: ``first`` makes the
    hidden units (with ``siblings``, e.g. a gate), ``second`` reads them."""

    first: str
    second: str
    siblings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairPermutation:
    """The order found for one pair and the weight errors (summed squares of both
    layers' relative errors) of its method before and after."""

    pair: MLPPair
    perm: torch.Tensor
    error_before: float
    error_after: float


def mlp_pairs(plan: Plan, source: Checkpoint) -> list[MLPPair]:
    """The MLP pairs of ``plan``: both layers planned, matching shapes, siblings present."""
    planned = {layer.name: layer for layer in plan.layers}
    pairs = []
    for name, layer in planned.items():
        for pattern, second_template, sibling_templates in PAIR_RULES:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            second = match.expand(second_template)
            siblings = tuple(match.expand(s) for s in sibling_templates)
            hidden = layer.shape[0]
            if (
                second in planned
                and planned[second].shape[1] == hidden
                and all(f"{s}.weight" in source.infos for s in siblings)
            ):
                pairs.append(MLPPair(name, second, siblings))
            break
    return pairs


def _structured_chains(layer: LayerPlan) -> list[Chain]:
    """The method's candidate chains that a hidden-unit order can change (depth >= 2,
    not low rank: a low-rank fit is the same in any order)."""
    names = AUTO.weight if layer.method == "auto" else (layer.method,)
    chains = []
    for name in names:
        try:
            chains += STRUCTURES[name].chains(*layer.shape, layer.budget, layer.depth)
        except InputError:
            continue  # this structure does not fit the shape at this budget
    return [c for c in chains if _has_blocks(c)]


def _has_blocks(chain: Chain) -> bool:
    # a chain of dense factors (a = d = 1 everywhere, e.g. low rank) has no blocks to reorder
    return len(chain) >= 2 and any(p.a > 1 or p.d > 1 for p in chain.patterns)


def search_pairs(
    plan: Plan,
    source: Checkpoint,
    order: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[PairPermutation]:
    """Search a hidden-unit order for each MLP pair of ``plan``.

    The structure a layer's method picks on the shuffled weights need not be the one
    that fits once the units are ordered, so the search runs with the chosen chains
    and with the first ``SEARCH_PAIRS`` candidate chains of each method (paired in the
    method's order); the order whose re-factorized weight errors are lowest is kept,
    if it beats the identity.
    """
    layers = {layer.name: layer for layer in plan.layers}
    pairs = mlp_pairs(plan, source)
    found = []
    for index, pair in enumerate(pairs):
        result = _search_pair(pair, layers[pair.first], layers[pair.second], source, order)
        if result is not None:
            found.append(result)
        if progress is not None:
            progress(f"{pair.first}: hidden-unit order", index + 1, len(pairs))
    return found


def _search_pair(
    pair: MLPPair, first: LayerPlan, second: LayerPlan, source: Checkpoint, order: str
) -> PairPermutation | None:
    if "lowrank" in (first.method, second.method):
        return None  # a low-rank fit is the same in any order: nothing to search
    w1 = prepared_weight(source.load(first.weight_name), first.weight_name)
    w2 = prepared_weight(source.load(second.weight_name), second.weight_name)

    def fits(perm: torch.Tensor) -> tuple[Chain, Chain, float]:
        fit1 = fit_weight(first.method, w1[perm], first.budget, first.depth, order)
        fit2 = fit_weight(second.method, w2[:, perm], second.budget, second.depth, order)
        return fit1.chain, fit2.chain, fit1.rel_error**2 + fit2.rel_error**2

    identity = torch.arange(w1.shape[0])
    *chosen, before = fits(identity)
    tries = [tuple(chosen), *zip(_structured_chains(first), _structured_chains(second))]
    best, best_error = identity, before
    for chain1, chain2 in tries[: SEARCH_PAIRS + 1]:
        if not (_has_blocks(chain1) and _has_blocks(chain2)):
            continue
        perm = search_permutation(w1, w2, chain1, chain2)
        if not torch.equal(perm, identity) and (after := fits(perm)[2]) < best_error:
            best, best_error = perm, after
    return PairPermutation(pair, best, before, best_error) if best_error < before else None


def permuted_checkpoint(source: Checkpoint, permutations: list[PairPermutation]) -> Checkpoint:
    """A view of ``source`` whose MLP pairs read in permuted hidden order: rows of the
    first layer, its siblings and their biases, columns of the second layer."""
    axes: dict[str, tuple[int, torch.Tensor]] = {}
    for found in permutations:
        for producer in (found.pair.first, *found.pair.siblings):
            axes[f"{producer}.weight"] = (0, found.perm)
            if f"{producer}.bias" in source.infos:
                axes[f"{producer}.bias"] = (0, found.perm)
        axes[f"{found.pair.second}.weight"] = (1, found.perm)
    load = source.load

    def permuted(name: str) -> torch.Tensor:
        tensor = load(name)
        if name not in axes:
            return tensor
        axis, perm = axes[name]
        return tensor.index_select(axis, perm).contiguous()

    return dataclasses.replace(source, _loader=permuted)


def permutation_report(permutations: list[PairPermutation]) -> list[dict]:
    return [
        {
            "first": p.pair.first,
            "second": p.pair.second,
            "siblings": list(p.pair.siblings),
            "weight_error_before": round(p.error_before**0.5, 6),
            "weight_error_after": round(p.error_after**0.5, 6),
        }
        for p in permutations
    ]
