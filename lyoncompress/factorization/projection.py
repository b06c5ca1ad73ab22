"""Hierarchical, error-guaranteed projection of a dense matrix onto a chainable chain.

The algorithm (Le, Zheng, Riccietti, Gribonval, "Butterfly factorization with
error guarantees"): a chainable chain split after factor ℓ is a product of two
KS-supported matrices, ``W = H_left · H_right`` with patterns
``(1, m/d_ℓ, k_ℓ/d_ℓ, d_ℓ)`` and ``(a_{ℓ+1}, k_ℓ/a_{ℓ+1}, n/a_{ℓ+1}, 1)``. Their product
decomposes into ``d_ℓ · a_{ℓ+1}`` independent blocks of rank ``r_ℓ``, so the best
split is one batched truncated SVD. Each half is again a batch of dense matrices
to factor onto a shorter chain, so the algorithm recurses.

Orthonormalisation: in left-to-right order every split gives the *left* half the
orthonormal ``U`` and pushes ``Σ Vᴴ`` into the remainder. Each left factor is then
an isometry on matrices supported like the remainder, the errors of successive
splits are orthogonal, and ``‖A - Â‖² = Σ_ℓ e_ℓ² ≤ L · E(A)²``: the ``√L``
guarantee. Right-to-left is the mirror image (``Vᴴ`` stays, ``UΣ`` moves left).

Any other order (``balanced``: middle split first, then each half the same way)
needs a sweep before each split, as in pyfaust's ``fdb``: every piece left of the
one about to be split is made left-orthonormal (QR of its columns at the interface
with its right neighbour, ``R`` pushed into that neighbour) and every piece right
of it right-orthonormal (the mirror image), the mixed canonical form of tensor
trains. The pieces around the split then act as an isometry and a co-isometry, so
each split's error is its own SVD truncation error, undistorted. Each split gives
its orthonormal factor to the half the *next* split leaves alone, so the sweep
only re-orthonormalises what a split in between disturbed, and in left-to-right
or right-to-left order it never runs. The split errors of a non-monotone order
are not mutually orthogonal, so no ``√L`` bound is claimed for ``balanced``;
measured on a butterfly + 1% noise (N=1024, ``benchmarks/projection.py``) it gives
0.99458% error, left-to-right 0.99467% (pyfaust ``fdb``: 0.9946% and 0.9947%),
balanced *without* the sweep (``orthonormal=False``) 1.33% and left-to-right
without orthonormal splits 4.7%.

The reported error is ``sqrt(Σ e_ℓ²)`` where that is exact (orthonormal splits in a
monotone order); otherwise the chain is materialised by merging the twiddles back
pairwise (the inverse of a split, one batched rank-``r`` product each), which costs
far less than ``Chain.to_dense``.

Throughout, a sub-problem is a tensor ``T`` of shape ``(A, D, M, N)``: ``A·D``
independent ``M × N`` matrices to factor onto the chain divided by ``(A, D)``,
i.e. the KS pattern ``(A, M, N, D)`` whose twiddle ``T`` already is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import torch

from lyoncompress.butterfly import Chain, KSPattern
from lyoncompress.errors import InputError

Order = Literal["left-to-right", "right-to-left", "balanced"]
ORDERS: tuple[str, ...] = ("left-to-right", "right-to-left", "balanced")


@dataclass(frozen=True)
class Projection:
    """Twiddles of the projected chain and the relative Frobenius error ``‖W-Ŵ‖/‖W‖``."""

    chain: Chain
    twiddles: list[torch.Tensor]
    rel_error: float


def check_matrix(weight: torch.Tensor, name: str = "matrix") -> None:
    """Refuse what no factorization can use: not 2-D, empty, NaN/Inf."""
    if weight.ndim != 2:
        raise InputError(
            f"{name} has shape {tuple(weight.shape)}; only 2-D matrices can be factorized "
            "(reshape convolution kernels to (out, in*kh*kw) first)"
        )
    if weight.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(weight.shape)})")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise InputError(f"{name} contains {bad} NaN/Inf values; fix the checkpoint first")


def project(
    weight: torch.Tensor,
    chain: Chain,
    order: Order = "left-to-right",
    orthonormal: bool = True,
) -> Projection:
    """Project ``weight`` (m × n) onto the chainable ``chain``.

    Args:
        weight: dense matrix, real or complex, float32/float64, any device.
        chain: chainable chain with ``a_1 = d_L = 1`` and ``chain.shape == weight.shape``.
        order: which split first: ``left-to-right`` (the √L guarantee, default),
            ``right-to-left`` (mirror image, same guarantee for ``W.T``) or
            ``balanced`` (middle split first, orthonormalising sweep before each
            split; no proven bound).
        orthonormal: orthonormal SVD factors and the sweep (module docstring); False
            splits ``U√Σ | √ΣVᴴ`` with no sweep (for study).

    Returns:
        ``Projection`` with one twiddle per factor, in ``weight``'s dtype and device.

    Example:
        >>> chain = square_butterfly(16)
        >>> proj = project(torch.randn(16, 16, dtype=torch.float64), chain)
        >>> len(proj.twiddles), proj.rel_error < 1
        (4, True)
    """
    check_matrix(weight)
    chain.check_chainable()
    if order not in ORDERS:
        raise InputError(f"unknown projection order {order!r}; choose one of {', '.join(ORDERS)}")
    if tuple(weight.shape) != chain.shape:
        raise InputError(f"chain {chain} has shape {chain.shape} but the matrix is {tuple(weight.shape)}")
    first, last = chain.patterns[0], chain.patterns[-1]
    if first.a != 1 or last.d != 1:
        raise InputError(
            f"chain {chain} has a sparse product (a_1={first.a}, d_L={last.d}); "
            "a dense matrix needs a_1 = d_L = 1"
        )
    if not (weight.dtype.is_floating_point or weight.dtype.is_complex):
        raise InputError(f"matrix dtype {weight.dtype} is not a float or complex type")
    # Every op here works on small blocks; up to this size they do not amortise
    # threading, which collapses on a shared machine (see _lapack).
    with _one_thread(weight.device.type == "cpu" and weight.numel() <= SMALL_PROBLEM):
        return _project(weight, chain, order, orthonormal)


def _project(weight: torch.Tensor, chain: Chain, order: Order, orthonormal: bool) -> Projection:
    """``project`` once its inputs are checked: the splits in ``order``, then the error."""
    patterns = chain.patterns
    splits = _split_order(len(patterns), order)
    pieces = [_Piece(0, len(patterns), weight.reshape(1, 1, *weight.shape))]  # (A, D, M, N) = (1, 1, m, n)
    lost = weight.new_zeros((), dtype=weight.real.dtype)  # ‖·‖² discarded by the truncations
    for step, boundary in enumerate(splits):
        j = next(i for i, piece in enumerate(pieces) if piece.start < boundary < piece.stop)
        if orthonormal:
            _canonicalise(pieces, j)
        piece = pieces[j]
        keep = _keep(orthonormal, boundary, splits[step + 1] if step + 1 < len(splits) else None)
        p, q, rank = _interface(patterns, piece.start, boundary, piece.stop)
        left, right, lost_here = _split(piece.twiddle, p, q, rank, keep)
        lost = lost + lost_here
        pieces[j : j + 1] = [
            _Piece(piece.start, boundary, left, "left" if keep == "left" else None),
            _Piece(boundary, piece.stop, right, "right" if keep == "right" else None),
        ]
    twiddles = [piece.twiddle.contiguous() for piece in pieces]
    norm = max(float(torch.linalg.vector_norm(weight)), 1e-300)
    if orthonormal and splits in (sorted(splits), sorted(splits, reverse=True)):
        # Monotone order with orthonormal splits: the errors are orthogonal (module docstring)
        rel_error = float(lost.sqrt()) / norm
    else:
        approx = _materialise(twiddles, patterns, 0, len(patterns)).reshape(weight.shape)
        rel_error = float(torch.linalg.vector_norm(weight - approx)) / norm
    return Projection(chain=chain, twiddles=twiddles, rel_error=rel_error)


Keep = Literal["left", "right", "sqrt"]


@dataclass
class _Piece:
    """The product of factors ``start … stop-1`` as a sub-problem ``twiddle (A, D, M, N)``.

    ``form`` is ``"left"`` when the twiddle is orthonormal on its interface with the next
    piece (the blocks of its columns there, see ``_orthonormalise_left``), ``"right"`` when
    it is on its interface with the previous piece, None when neither is known.
    """

    start: int
    stop: int
    twiddle: torch.Tensor
    form: Literal["left", "right"] | None = None


def _split_order(depth: int, order: str) -> list[int]:
    """The boundaries to split at, in order; boundary ``ℓ`` separates factors ``ℓ-1`` and ``ℓ``."""
    if order == "left-to-right":
        return list(range(1, depth))
    if order == "right-to-left":
        return list(range(depth - 1, 0, -1))

    def middle_first(start: int, stop: int) -> list[int]:
        if stop - start < 2:
            return []
        middle = start + (stop - start) // 2
        return [middle, *middle_first(start, middle), *middle_first(middle, stop)]

    return middle_first(0, depth)


def _keep(orthonormal: bool, boundary: int, next_boundary: int | None) -> Keep:
    """Which half of this split gets the orthonormal SVD factor: the one that the next split
    does not touch, so that the sweep before it has nothing left to orthonormalise there."""
    if not orthonormal:
        return "sqrt"
    return "right" if next_boundary is not None and next_boundary < boundary else "left"


def _interface(patterns: Sequence[KSPattern], start: int, boundary: int, stop: int) -> tuple[int, int, int]:
    """``(p, q, r)`` of the split at ``boundary`` of the product of factors ``start … stop-1``:
    ``p = a_ℓ / A`` and ``q = d_{ℓ-1} / D`` inside that sub-problem, ``r`` the rank."""
    left, right = patterns[boundary - 1], patterns[boundary]
    p = right.a // patterns[start].a
    q = left.d // patterns[stop - 1].d
    return p, q, left.a * left.c // right.a


def _canonicalise(pieces: list[_Piece], j: int) -> None:
    """Make every piece left of ``j`` left-orthonormal and every piece right of it
    right-orthonormal (what tensor-train codes call the mixed canonical form around ``j``),
    pushing each QR's triangular factor into the neighbour towards ``j``.

    Then the product left of piece ``j`` is an isometry and the one right of it a
    co-isometry on matrices supported like piece ``j``, so the error made by splitting
    piece ``j`` is the error of that split, undistorted. Pieces already in form (the
    orthonormal SVD factors of earlier splits) are skipped; in left-to-right and
    right-to-left order that is every piece, and the sweep does nothing.
    """
    for i in range(j):
        if pieces[i].form != "left":
            pieces[i].twiddle, pieces[i + 1].twiddle = _orthonormalise_left(
                pieces[i].twiddle, pieces[i + 1].twiddle
            )
            pieces[i].form, pieces[i + 1].form = "left", None
    for i in range(len(pieces) - 1, j, -1):
        if pieces[i].form != "right":
            pieces[i - 1].twiddle, pieces[i].twiddle = _orthonormalise_right(
                pieces[i - 1].twiddle, pieces[i].twiddle
            )
            pieces[i - 1].form, pieces[i].form = None, "right"


def _neighbours(left: torch.Tensor, right: torch.Tensor) -> tuple[int, int, int]:
    """``(p, q, r)`` of the interface between adjacent pieces ``left (A, q·D', M, p·r)`` and
    ``right (A·p, D', r·q, N)``, read off their shapes."""
    p = right.shape[0] // left.shape[0]
    q = left.shape[1] // right.shape[1]
    return p, q, left.shape[3] // p


def _orthonormalise_left(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of ``left``'s columns at the interface (one ``M × r`` matrix per ``(A, q·D', p)``),
    ``R`` pushed into the matching rows of ``right``: the product is unchanged."""
    a, qd, m, pr = left.shape
    p, q, r = _neighbours(left, right)
    d, n = right.shape[1], right.shape[3]
    cols = left.reshape(a, qd, m, p, r).transpose(2, 3)  # (A, q·D', p, M, r)
    ortho, tri = _lapack(torch.linalg.qr, cols)  # (A, q·D', p, M, k), (A, q·D', p, k, r); k = min(M, r)
    ortho, tri = _pad_rank(ortho, tri, r)
    left = ortho.transpose(2, 3).reshape(a, qd, m, pr)
    # right rows are ((A, p), D', (r, q)): R of batch (A, (q, D'), p) mixes its r
    tri = tri.reshape(a, q, d, p, r, r)
    right = torch.einsum("aqdpst,apdtqn->apdsqn", tri, right.reshape(a, p, d, r, q, n))  # (A, p, D', r, q, N)
    return left, right.reshape(a * p, d, r * q, n)


def _orthonormalise_right(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror image of ``_orthonormalise_left``: LQ of ``right``'s rows at the interface (one
    ``r × N`` matrix per ``(A·p, q, D')``, by QR of the adjoint), ``L`` pushed into ``left``."""
    ap, d, rq, n = right.shape
    p, q, r = _neighbours(left, right)
    a, m = left.shape[0], left.shape[2]
    rows = right.reshape(ap, d, r, q, n).transpose(2, 3)  # (A·p, D', q, r, N)
    ortho, tri = _lapack(torch.linalg.qr, rows.mH)  # rows = triᴴ orthoᴴ; ortho (.., N, k), tri (.., k, r)
    ortho, tri = _pad_rank(ortho, tri, r)
    right = ortho.mH.transpose(2, 3).reshape(ap, d, rq, n)
    # left columns are ((A, (q, D'), M, (p, r)): L = triᴴ of batch ((A, p), D', q) mixes their r
    lower = tri.mH.reshape(a, p, d, q, r, r)
    left = torch.einsum("aqdmps,apdqst->aqdmpt", left.reshape(a, q, d, m, p, r), lower)  # (A, q, D', M, p, r)
    return left.reshape(a, q * d, m, p * r), right


def _split(
    target: torch.Tensor, p: int, q: int, rank: int, keep: Keep
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best split of ``target (A, D, M, N)`` into KS halves ``(1, M/q, p·r, q)`` and
    ``(p, r·q, N/p, 1)`` (per batch entry), by one batched truncated SVD. ``keep``
    says which half gets the orthonormal factor: ``left``, ``right`` or ``sqrt`` (neither).

    Returns the halves as new sub-problems, left ``(A, q·D, M/q, p·r)`` and right
    ``(A·p, D, r·q, N/p)``, and the squared Frobenius norm the truncation discarded.
    """
    outer_a, outer_d, m, n = target.shape
    b, c = m // q, n // p
    # rows (b, q), cols (p, c): block (q, p) of the product is a rank-r b × c matrix
    blocks = target.reshape(outer_a, outer_d, b, q, p, c).permute(0, 1, 3, 4, 2, 5)  # (A, D, q, p, b, c)
    left_blocks, right_blocks = _low_rank(blocks, rank, keep)  # (A, D, q, p, b, r), (A, D, q, p, r, c)
    lost = _residual_energy(blocks, left_blocks, right_blocks)
    # left twiddle per batch: (q, b, (p, r)) -> sub-problem (A, (q, D), b, p·r)
    left = left_blocks.permute(0, 2, 1, 4, 3, 5).reshape(outer_a, q * outer_d, b, p * rank)
    # right twiddle per batch: (p, (r, q), c) -> sub-problem ((A, p), D, r·q, c)
    right = right_blocks.permute(0, 3, 1, 4, 2, 5).reshape(outer_a * p, outer_d, rank * q, c)
    return left, right, lost


RESIDUAL_CHUNK = 1 << 22  # entries of the residual formed at a time


def _residual_energy(blocks: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``‖blocks - left @ right‖²`` formed a few rows at a time: the residual of a large
    layer would otherwise cost two more copies of it (product and difference)."""
    rows = blocks.shape[-2]
    per_row = blocks.numel() // rows
    step = max(1, RESIDUAL_CHUNK // per_row)
    lost = torch.zeros((), dtype=blocks.real.dtype, device=blocks.device)
    for start in range(0, rows, step):
        part = blocks[..., start : start + step, :] - left[..., start : start + step, :] @ right
        lost += torch.linalg.vector_norm(part).square()
    return lost


def _merge(left: torch.Tensor, right: torch.Tensor, p: int, q: int, rank: int) -> torch.Tensor:
    """Inverse of ``_split``: the sub-problem ``(A, D, M, N)`` whose halves are ``left`` and ``right``."""
    a, qd, b, _ = left.shape
    d, c = qd // q, right.shape[3]
    blocks = torch.einsum(
        "aqdbpr,apdrqc->adbqpc",
        left.reshape(a, q, d, b, p, rank),
        right.reshape(a, p, d, rank, q, c),
    )  # (A, D, b, q, p, c)
    return blocks.reshape(a, d, b * q, p * c)


def _materialise(
    twiddles: Sequence[torch.Tensor], patterns: Sequence[KSPattern], start: int, stop: int
) -> torch.Tensor:
    """Product of factors ``start … stop-1`` as a sub-problem ``(A, D, M, N)``, merged as a
    balanced tree: each merge costs one batched rank-r product, far less than applying
    every factor to an identity matrix (``Chain.to_dense``)."""
    if stop - start == 1:
        return twiddles[start]
    middle = (start + stop) // 2
    left = _materialise(twiddles, patterns, start, middle)
    right = _materialise(twiddles, patterns, middle, stop)
    return _merge(left, right, *_interface(patterns, start, middle, stop))


def _low_rank(blocks: torch.Tensor, rank: int, keep: Keep) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorization ``X Y`` of every ``b × c`` block of ``blocks (..., b, c)``:
    ``X (..., b, rank)`` has orthonormal columns (``keep="left"``), ``Y (..., rank, c)``
    orthonormal rows (``"right"``), or both carry ``√σ`` (``"sqrt"``). Ranks above
    ``min(b, c)`` are padded with zeros.

    Rather than a full SVD (only ``rank`` triplets are used), the dominant subspace of the
    smaller side comes from ``eigh`` of its ``s × s`` Gram matrix, ``s = min(b, c)``: a
    batch of small ``eigh`` costs a half of the same ``svd``, and much less on skinny
    blocks. The Gram matrix squares the condition number, so that subspace is off by
    ``ε·σ₁²/σ_r²``, which would show as a ``1e-12`` error on exact products; one step of
    subspace iteration recovers the other side's subspace to ``ε·σ₁/σ_r``, as accurate
    as an SVD, and the blocks are projected onto that one.
    """
    b, c = blocks.shape[-2:]
    tall = b > c
    wide = blocks.mH if tall else blocks  # (..., s, t) with s <= t
    k = min(rank, wide.shape[-2])
    _, vectors = _lapack(torch.linalg.eigh, wide @ wide.mH)  # (..., s, s), ascending eigenvalues
    long, _ = _lapack(torch.linalg.qr, wide.mH @ vectors[..., -k:])  # (..., t, k) orthonormal
    short = wide @ long  # (..., s, k): wide ≈ short @ longᴴ
    if keep == "sqrt":
        u, s, vh = _lapack(
            partial(torch.linalg.svd, full_matrices=False), short
        )  # (.., s, k) (.., k) (.., k, k)
        root = s.sqrt().to(u.dtype).unsqueeze(-2)  # (..., 1, k)
        short, long = u * root, long @ vh.mH * root
    elif (keep == "left") != tall:  # the orthonormal factor belongs on the short side
        ortho, tri = _lapack(torch.linalg.qr, short)  # (..., s, k), (..., k, k)
        short, long = ortho, long @ tri.mH
    x, y = (long, short.mH) if tall else (short, long.mH)  # blocks ≈ x @ y
    return _pad_rank(x, y, rank)


def _pad_rank(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``x (..., m, k)`` and ``y (..., k, n)`` with zeros to ``k = rank``."""
    pad = rank - x.shape[-1]
    if pad == 0:
        return x, y
    return torch.nn.functional.pad(x, (0, pad)), torch.nn.functional.pad(y, (0, 0, 0, pad))


SMALL_MATRIX = 256 * 256  # entries of one LAPACK operand up to which a batch runs on one thread
SMALL_PROBLEM = 1 << 22  # entries of the matrix up to which all of project runs on one thread
Result = TypeVar("Result")


def _lapack(op: Callable[[torch.Tensor], Result], matrices: torch.Tensor) -> Result:
    """``op(matrices)`` for a batched LAPACK ``op`` (``eigh``, ``qr``, ``svd``), on one thread
    when the matrices are small.

    torch runs a CPU batch as a loop of LAPACK calls, each threaded by MKL/OpenMP: for
    small matrices every call pays a fork/join, and on a loaded machine a barrier that waits
    for a descheduled thread. Measured on 2 shared cores (load ~10), 1024 ``eigh`` of
    32×32 took 638 ms with 2 threads and 102 ms with 1; ``svd`` 1755 ms and 190 ms.
    """
    rows, cols = matrices.shape[-2:]
    with _one_thread(matrices.device.type == "cpu" and rows * cols <= SMALL_MATRIX):
        return op(matrices)


@contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)`` when ``enabled``; the thread count is
    global to the process, so it is restored however the block ends."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
