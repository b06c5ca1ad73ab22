"""Hidden-unit permutation search for an MLP ``y = W2 σ(W1 x + b1) + b2``.

Reordering hidden units, ``W1[perm]``, ``b1[perm]``, ``W2[:, perm]``, leaves the
function unchanged, but moves rows of ``W1`` and columns of ``W2`` between the
blocks that a chain ties together. A depth-≥2 chainable chain split once is
``W = H_left H_right`` where every block (rows ``≡ i mod d``, columns in
contiguous group ``j``) has rank ``r`` (see ``factorization/projection.py``). So:

* for ``W1`` (hidden × in), hidden units matter through their *row residue*
  ``mod d_1`` (first split of ``chain1``): units sharing a residue should span
  an ``r``-dimensional space inside every input group;
* for ``W2`` (out × hidden), through their *contiguous column group* (last split of
  ``chain2``): columns sharing a group should span an ``r``-dimensional space
  inside every output residue class.

Each side is a balanced subspace-clustering problem, solved by k-subspaces
(assign every unit to the cluster whose subspaces capture most of its energy,
refit the subspaces by SVD) with capacities, from the current order and from
random starts. Units then go to positions whose (residue, group) cell matches
both labels. The searched order is kept only when its projection error beats
the identity's.
"""

from __future__ import annotations

import torch

from lyoncompress.butterfly import Chain
from lyoncompress.errors import InputError
from lyoncompress.factorization.projection import project


def search_permutation(
    w1: torch.Tensor,
    w2: torch.Tensor,
    chain1: Chain,
    chain2: Chain,
    iters: int = 15,
    restarts: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """An order of the hidden units that brings ``w1[perm]`` closer to ``chain1`` and
    ``w2[:, perm]`` closer to ``chain2``.

    Args:
        w1: ``(hidden, in)`` first weight; w2: ``(out, hidden)`` second weight.
        chain1, chain2: chainable chains of depth >= 2 for ``w1`` and ``w2``
            (e.g. ``monarch(hidden, in, k, r)`` and ``monarch(out, hidden, k, r)``).
        iters: k-subspaces iterations per start; restarts: random starts besides
            the current order; seed: of the random starts.

    Returns:
        ``perm`` (int64, length ``hidden``): apply with ``apply_permutation``. Its
        summed squared relative projection error is never above the identity's.

    Example:
        >>> perm = search_permutation(w1, w2, monarch(1536, 384, 4, 8), monarch(384, 1536, 4, 8))
        >>> w1p, b1p, w2p = apply_permutation(w1, b1, w2, perm)
    """
    hidden = w1.shape[0]
    if w2.shape[1] != hidden or chain1.shape != tuple(w1.shape) or chain2.shape != tuple(w2.shape):
        raise InputError(
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, chain1 {chain1.shape} and chain2 {chain2.shape} "
            "must describe an MLP: w1 (hidden, in), w2 (out, hidden), chains of the same shapes"
        )
    if len(chain1) < 2 or len(chain2) < 2:
        raise InputError("permutation search needs chains of depth >= 2 (a single factor has no blocks)")
    residues, in_groups, rank1 = chain1.patterns[0].d, chain1.patterns[1].a, chain1.ranks[0]
    col_groups, out_residues, rank2 = chain2.patterns[-1].a, chain2.patterns[-2].d, chain2.ranks[-1]
    w1d, w2d = w1.detach().to(torch.float64), w2.detach().to(torch.float64)
    feats1 = w1d.reshape(hidden, in_groups, -1) / w1d.norm()  # (hidden, groups, in/groups)
    feats2 = (
        w2d.T.reshape(hidden, -1, out_residues).transpose(1, 2) / w2d.norm()
    )  # (hidden, residues, out/residues)
    generator = torch.Generator().manual_seed(seed)
    units = torch.arange(hidden)
    score1 = _k_subspaces(feats1, units % residues, residues, rank1, iters, restarts, generator)
    score2 = _k_subspaces(
        feats2, units // (hidden // col_groups), col_groups, rank2, iters, restarts, generator
    )
    # cell (c1, c2) of position p: its residue for chain1, its column group for chain2
    cells = (units % residues) * col_groups + units // (hidden // col_groups)
    joint = (score1[:, :, None] + score2[:, None, :]).reshape(hidden, -1)  # (hidden, residues * groups)
    labels = _balanced_assign(joint, torch.bincount(cells, minlength=joint.shape[1]))
    perm = torch.empty(hidden, dtype=torch.int64)
    for cell in range(joint.shape[1]):
        perm[cells == cell] = (labels == cell).nonzero().flatten()
    if _projection_error(w1d, w2d, perm, chain1, chain2) < _projection_error(w1d, w2d, units, chain1, chain2):
        return perm
    return units


def apply_permutation(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(w1[perm], b1[perm], w2[:, perm])``: the same MLP with hidden units reordered.
    After it, the second layer's input second moment is ``gram[perm][:, perm]``."""
    return w1[perm], None if b1 is None else b1[perm], w2[:, perm]


def _projection_error(
    w1: torch.Tensor, w2: torch.Tensor, perm: torch.Tensor, chain1: Chain, chain2: Chain
) -> float:
    return project(w1[perm], chain1).rel_error ** 2 + project(w2[:, perm], chain2).rel_error ** 2


def _k_subspaces(
    feats: torch.Tensor,
    start: torch.Tensor,
    clusters: int,
    rank: int,
    iters: int,
    restarts: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Balanced k-subspaces on ``feats (units, groups, f)``: one rank-``rank``
    subspace per (cluster, group). Returns the energy each unit would keep in each
    cluster, ``(units, clusters)``, for the best of the starts."""
    units = feats.shape[0]
    capacity = torch.full((clusters,), units // clusters)
    best_score, best_total = None, -1.0
    starts = [start] + [start[torch.randperm(units, generator=generator)] for _ in range(restarts)]
    for labels in starts:
        for _ in range(iters):
            score = _captured_energy(feats, labels, clusters, rank)
            new = _balanced_assign(score, capacity)
            if torch.equal(new, labels):
                break
            labels = new
        score = _captured_energy(feats, labels, clusters, rank)
        total = float(score.gather(1, labels[:, None]).sum())
        if total > best_total:
            best_score, best_total = score, total
    return best_score


def _captured_energy(feats: torch.Tensor, labels: torch.Tensor, clusters: int, rank: int) -> torch.Tensor:
    """``score[u, c] = Σ_g ‖P_{c,g} feats[u, g]‖²`` with ``P_{c,g}`` the projector on the
    top-``rank`` row space of cluster ``c``'s units in group ``g``."""
    score = torch.empty(feats.shape[0], clusters, dtype=feats.dtype)
    for c in range(clusters):
        members = feats[labels == c].transpose(0, 1)  # (groups, members, f)
        basis = torch.linalg.svd(members, full_matrices=False).Vh[:, :rank]  # (groups, rank, f)
        coords = torch.einsum("grf,ugf->ugr", basis, feats)  # (units, groups, rank)
        score[:, c] = coords.square().sum(dim=(1, 2))
    return score


def _balanced_assign(score: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Greedy: take (unit, cluster) pairs by decreasing score while the unit is free
    and the cluster has room. ``capacity`` sums to the number of units."""
    units, clusters = score.shape
    order = torch.argsort(score.flatten(), descending=True).tolist()
    room = capacity.tolist()
    labels = [-1] * units
    left = units
    for flat in order:
        unit, cluster = divmod(flat, clusters)
        if labels[unit] < 0 and room[cluster] > 0:
            labels[unit] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.int64)
