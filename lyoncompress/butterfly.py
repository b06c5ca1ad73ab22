"""Kronecker-sparse (KS) patterns, chains of them, and their reference products.

Conventions (used everywhere in the package):

* A pattern ``(a, b, c, d)`` describes a factor ``X`` of shape ``(a*b*d, a*c*d)``
  whose support is ``I_a ⊗ 1_{b×c} ⊗ I_d``. Its non-zeros are stored dense as a
  *twiddle* of shape ``(a, d, b, c)``:
  ``X[(i, j, k), (i, l, k)] = twiddle[i, k, j, l]`` with row index
  ``(i, j, k) ∈ a×b×d`` and column index ``(i, l, k) ∈ a×c×d`` (row-major).
* A chain ``X_1 X_2 … X_L`` represents the ``m × n`` matrix ``W`` of an
  ``nn.Linear`` (out × in). Products are batch first, like ``nn.Linear``:
  ``y = x @ W.T`` for ``x`` of shape ``(B, n)``, so ``X_L`` is applied first.

This module is the test oracle for every faster path (CUDA kernels included);
it imports nothing from the package except the error types.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lyoncompress.errors import PatternError


@dataclass(frozen=True)
class KSPattern:
    """Support ``I_a ⊗ 1_{b×c} ⊗ I_d`` of a factor of shape ``(a*b*d, a*c*d)``."""

    a: int
    b: int
    c: int
    d: int

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PatternError(f"KSPattern{self.as_tuple()}: {name}={value!r} must be a positive integer")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.a, self.b, self.c, self.d)

    def __str__(self) -> str:
        return "({},{},{},{})".format(*self.as_tuple())

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the factor: ``(a*b*d, a*c*d)``."""
        return (self.a * self.b * self.d, self.a * self.c * self.d)

    @property
    def twiddle_shape(self) -> tuple[int, int, int, int]:
        return (self.a, self.d, self.b, self.c)

    @property
    def nnz(self) -> int:
        return self.a * self.b * self.c * self.d

    def transpose(self) -> KSPattern:
        """Pattern of ``X.T``; its twiddle is ``twiddle.transpose(-1, -2)``."""
        return KSPattern(self.a, self.c, self.b, self.d)

    def support(self) -> torch.Tensor:
        """Boolean mask of shape ``self.shape`` that is True on the support."""
        ones = torch.ones(self.twiddle_shape, dtype=torch.float64)
        return self.to_dense(ones) != 0

    def to_dense(self, twiddle: torch.Tensor) -> torch.Tensor:
        """Materialise the factor: twiddle ``(a, d, b, c)`` -> ``(a*b*d, a*c*d)``."""
        self.check_twiddle(twiddle)
        a, b, c, d = self.as_tuple()
        eye_a = torch.eye(a, dtype=twiddle.dtype, device=twiddle.device)
        eye_d = torch.eye(d, dtype=twiddle.dtype, device=twiddle.device)
        # (a, b, d, a, c, d): X[i,j,k,i',l,k'] = δ_ii' δ_kk' twiddle[i,k,j,l]
        dense = torch.einsum("idjl,ie,dk->ijdelk", twiddle, eye_a, eye_d)
        return dense.reshape(a * b * d, a * c * d)

    def from_dense(self, matrix: torch.Tensor) -> torch.Tensor:
        """Twiddle of the entries of ``matrix`` on the support (the rest is dropped)."""
        if tuple(matrix.shape) != self.shape:
            raise PatternError(
                f"pattern {self} needs a matrix of shape {self.shape}, got {tuple(matrix.shape)}"
            )
        a, b, c, d = self.as_tuple()
        # (a, b, d, a, c, d) -> diagonal over both a and d -> (a, d, b, c)
        blocks = matrix.reshape(a, b, d, a, c, d)
        return torch.einsum("ijdild->idjl", blocks).contiguous()

    def apply(self, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x @ X.T``: ``x (B, a*c*d) -> y (B, a*b*d)`` as one einsum."""
        a, b, c, d = self.as_tuple()
        if x.shape[-1] != a * c * d:
            raise PatternError(f"pattern {self} takes inputs with {a * c * d} features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x4 = x.reshape(-1, a, c, d)  # (B, a, c, d)
        y4 = torch.einsum("adbc,Bacd->Babd", twiddle, x4)  # (B, a, b, d)
        return y4.reshape(*lead, a * b * d)

    def check_twiddle(self, twiddle: torch.Tensor) -> None:
        if tuple(twiddle.shape) != self.twiddle_shape:
            raise PatternError(
                f"pattern {self} needs a twiddle of shape {self.twiddle_shape}, got {tuple(twiddle.shape)}"
            )


@dataclass(frozen=True)
class Chain:
    """Patterns ``π_1 … π_L`` of a product ``X_1 X_2 … X_L`` with matching shapes."""

    patterns: tuple[KSPattern, ...]

    def __post_init__(self) -> None:
        patterns = tuple(p if isinstance(p, KSPattern) else KSPattern(*p) for p in self.patterns)
        object.__setattr__(self, "patterns", patterns)
        if not patterns:
            raise PatternError("a chain needs at least one factor (depth 0 given)")
        for i, (left, right) in enumerate(zip(patterns, patterns[1:])):
            if left.shape[1] != right.shape[0]:
                raise PatternError(
                    f"factor {i} {left} has {left.shape[1]} columns but factor {i + 1} "
                    f"{right} has {right.shape[0]} rows; consecutive factors must match"
                )

    @classmethod
    def of(cls, *patterns: Sequence[int] | KSPattern) -> Chain:
        """``Chain.of((1, 2, 2, 4), (2, 2, 2, 2), …)``."""
        return cls(tuple(p if isinstance(p, KSPattern) else KSPattern(*p) for p in patterns))

    def __len__(self) -> int:
        return len(self.patterns)

    def __str__(self) -> str:
        return " ".join(str(p) for p in self.patterns)

    def to_json(self) -> list[list[int]]:
        return [list(p.as_tuple()) for p in self.patterns]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.patterns[0].shape[0], self.patterns[-1].shape[1])

    @property
    def params(self) -> int:
        return sum(p.nnz for p in self.patterns)

    @property
    def twiddle_shapes(self) -> list[tuple[int, int, int, int]]:
        return [p.twiddle_shape for p in self.patterns]

    def chainability_problem(self) -> str | None:
        """Why the chain is not chainable, or None when it is."""
        for i, (left, right) in enumerate(zip(self.patterns, self.patterns[1:])):
            if right.a % left.a:
                return f"factor {i + 1} {right}: a={right.a} is not a multiple of a={left.a} of factor {i}"
            if left.d % right.d:
                return f"factor {i + 1} {right}: d={right.d} does not divide d={left.d} of factor {i}"
            if (left.a * left.c) % right.a:
                return f"factors {i},{i + 1}: rank a·c/a' = {left.a * left.c}/{right.a} is not an integer"
        return None

    @property
    def is_chainable(self) -> bool:
        return self.chainability_problem() is None

    def check_chainable(self) -> None:
        problem = self.chainability_problem()
        if problem is not None:
            raise PatternError(f"chain {self} is not chainable: {problem}")

    @property
    def ranks(self) -> list[int]:
        """``r_ℓ = a_ℓ c_ℓ / a_{ℓ+1}`` for each split (chainable chains only)."""
        self.check_chainable()
        return [l.a * l.c // r.a for l, r in zip(self.patterns, self.patterns[1:])]

    def transpose(self) -> Chain:
        """Chain of ``W.T = X_L.T … X_1.T``; twiddles map by ``transpose_twiddles``."""
        return Chain(tuple(p.transpose() for p in reversed(self.patterns)))

    def check_twiddles(self, twiddles: Sequence[torch.Tensor]) -> None:
        if len(twiddles) != len(self.patterns):
            raise PatternError(f"chain {self} has {len(self)} factors, got {len(twiddles)} twiddles")
        for pattern, twiddle in zip(self.patterns, twiddles):
            pattern.check_twiddle(twiddle)

    def apply(self, twiddles: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` with ``W = X_1 … X_L``: ``(B, n) -> (B, m)``."""
        self.check_twiddles(twiddles)
        for pattern, twiddle in zip(reversed(self.patterns), reversed(twiddles)):
            x = pattern.apply(twiddle, x)
        return x

    def to_dense(self, twiddles: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``m × n`` matrix ``X_1 … X_L``."""
        self.check_twiddles(twiddles)
        n = self.shape[1]
        eye = torch.eye(n, dtype=twiddles[0].dtype, device=twiddles[0].device)
        return self.apply(twiddles, eye).T  # rows of eye @ W.T are the columns of W


def transpose_twiddles(twiddles: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Twiddles of ``Chain.transpose()`` from those of the chain."""
    return [t.transpose(-1, -2) for t in reversed(twiddles)]


def square_butterfly(n: int, radix: int = 2) -> Chain:
    """The classic square butterfly of size ``n = radix**L``: ``(r^{ℓ-1}, r, r, r^{L-ℓ})``."""
    if radix < 2:
        raise PatternError(f"radix must be >= 2, got {radix}")
    depth = round(math.log(n, radix)) if n > 1 else 0
    if n < radix or radix**depth != n:
        raise PatternError(
            f"a radix-{radix} butterfly needs a size that is a power of {radix}, got {n}; "
            "use search_chains() for other sizes"
        )
    return Chain.of(*[(radix ** (i - 1), radix, radix, radix ** (depth - i)) for i in range(1, depth + 1)])


def monarch(m: int, n: int, blocks: int, rank: int = 1) -> Chain:
    """Monarch ``(1, m/k, k·r, k) (k, k·r, n/k, 1)`` with ``k = blocks`` block-diagonal parts."""
    if blocks < 1 or m % blocks or n % blocks:
        raise PatternError(f"Monarch with {blocks} blocks needs the block count to divide both {m} and {n}")
    if rank < 1:
        raise PatternError(f"Monarch rank must be >= 1, got {rank}")
    k = blocks
    return Chain.of((1, m // k, k * rank, k), (k, k * rank, n // k, 1))


def lowrank(m: int, n: int, rank: int) -> Chain:
    """Rank-``r`` product ``U V`` as the chain ``(1, m, r, 1) (1, r, n, 1)``."""
    if not 1 <= rank:
        raise PatternError(f"rank must be >= 1, got {rank}")
    return Chain.of((1, m, rank, 1), (1, rank, n, 1))


def _ordered_factorizations(value: int, parts: int, least: int = 1) -> Iterator[tuple[int, ...]]:
    """All tuples of ``parts`` integers ``>= least`` whose product divides ``value``.

    With ``least >= 2`` a branch stops as soon as the rest cannot fit (``least**left``
    must still divide into what is left), so deep chains cost what they yield: a
    radix-2 butterfly of size 1024 has 10 such tuples at depth 10, not 10^8 to filter.
    """
    if parts == 0:
        yield ()
        return
    for first in _divisors(value):
        if first < least or value // first < least ** (parts - 1):
            continue
        for rest in _ordered_factorizations(value // first, parts - 1, least):
            yield (first, *rest)


def _divisors(value: int) -> list[int]:
    return [k for k in range(1, value + 1) if value % k == 0]


def chain_from_splits(m: int, n: int, p: Sequence[int], q: Sequence[int], r: Sequence[int]) -> Chain:
    """The chainable chain with dense support (``a_1 = d_L = 1``) given per split ``ℓ``:
    ``p_ℓ = a_{ℓ+1}/a_ℓ``, ``q_ℓ = d_ℓ/d_{ℓ+1}`` and the rank ``r_ℓ``.

    Then ``c_ℓ = p_ℓ r_ℓ`` and ``b_{ℓ+1} = q_ℓ r_ℓ``; ``Π q`` must divide ``m`` and
    ``Π p`` must divide ``n``.
    """
    depth = len(p) + 1
    if not len(p) == len(q) == len(r):
        raise PatternError("p, q and r need one entry per split")
    a = [math.prod(p[:i]) for i in range(depth)]
    d = [math.prod(q[i:]) for i in range(depth)]
    if m % d[0] or n % a[-1]:
        raise PatternError(f"splits p={list(p)} q={list(q)} do not fit a {m}x{n} matrix")
    b = [m // d[0]] + [q[i] * r[i] for i in range(depth - 1)]
    c = [p[i] * r[i] for i in range(depth - 1)] + [n // a[-1]]
    return Chain.of(*zip(a, b, c, d))


def search_chains(
    m: int,
    n: int,
    depth: int,
    max_params: int | None = None,
    max_rank: int | None = None,
) -> list[Chain]:
    """Every chainable chain of ``depth`` factors with dense support for an ``m × n``
    matrix, ranked by parameter count (fewest first).

    Args:
        m, n: the matrix shape (any positive integers: 384, 768, 3·5·7 …).
        depth: number of factors ``L >= 1``.
        max_params: keep only chains with at most this many parameters.
        max_rank: largest rank ``r_ℓ`` tried at each split; defaults to 1 (classic
            butterflies) when ``max_params`` is None, else to ``min(m, n)``.

    Returns:
        Chains sorted by (params, str). Raises ``PatternError`` when none exists.
    """
    if depth < 1:
        raise PatternError(f"depth must be >= 1, got {depth}; a chain needs at least one factor")
    if m < 1 or n < 1:
        raise PatternError(f"matrix shape must be positive, got {m}x{n}")
    if max_rank is None:
        max_rank = 1 if max_params is None else min(m, n)
    found: list[Chain] = []
    splits = depth - 1
    for q in _ordered_factorizations(m, splits):
        for p in _ordered_factorizations(n, splits):
            found.extend(_chains_with_ranks(m, n, p, q, max_rank, max_params))
    if not found:
        limit = f" with at most {max_params} parameters" if max_params is not None else ""
        raise PatternError(
            f"no chainable chain of depth {depth} factors a {m}x{n} matrix{limit}; "
            "try a smaller depth or a larger parameter budget"
        )
    found.sort(key=lambda chain: (chain.params, str(chain)))
    return found


def _chains_with_ranks(
    m: int, n: int, p: tuple[int, ...], q: tuple[int, ...], max_rank: int, max_params: int | None
) -> Iterator[Chain]:
    depth = len(p) + 1
    a = [math.prod(p[:i]) for i in range(depth)]
    d = [math.prod(q[i:]) for i in range(depth)]
    if m % d[0] or n % a[-1]:
        return
    b0, c_last = m // d[0], n // a[-1]
    # A rank above the size of the blocks split at ℓ, (m/d_ℓ) × (n/a_{ℓ+1}), adds
    # parameters and no expressiveness.
    useful = [min(max_rank, m // d[i], n // a[i + 1]) for i in range(depth - 1)]
    budget = math.inf if max_params is None else max_params

    def factor_params(i: int, r_prev: int, r_next: int) -> int:
        b = b0 if i == 0 else q[i - 1] * r_prev
        c = c_last if i == depth - 1 else p[i] * r_next
        return a[i] * b * c * d[i]

    def extend(ranks: tuple[int, ...], spent: int) -> Iterator[tuple[int, ...]]:
        i = len(ranks)  # choosing r_i closes factor i
        if i == depth - 1:
            last = factor_params(i, ranks[-1] if ranks else 1, 1)
            if spent + last <= budget:
                yield ranks
            return
        r_prev = ranks[-1] if ranks else 1
        for r in range(1, useful[i] + 1):
            cost = factor_params(i, r_prev, r)
            # the remaining factors cost at least their rank-1 value
            floor = sum(factor_params(j, r if j == i + 1 else 1, 1) for j in range(i + 1, depth))
            if spent + cost + floor > budget:
                break  # params grow with r: larger ranks cannot fit either
            yield from extend((*ranks, r), spent + cost)

    for ranks in extend((), 0):
        yield chain_from_splits(m, n, p, q, ranks)


def _uniform_ranks(
    m: int, n: int, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]], max_params: int
) -> list[tuple[int, tuple[int, ...], tuple[int, ...], int]]:
    """``(params, p, q, r)`` for every pair of splits, ``r`` the largest uniform rank
    within ``max_params`` (pairs where rank 1 does not fit are left out).

    With ``a_ℓ = Π p_{<ℓ}`` and ``d_ℓ = Π q_{>=ℓ}`` the chain has
    ``params(r) = quad · r² + lin · r`` where ``lin = m p_0 + n q_{L-2}`` (first and
    last factor) and ``quad = Σ_{0<ℓ<L-1} (a_ℓ p_ℓ)(d_ℓ q_{ℓ-1})`` (middle factors): a
    matrix product over all pairs at once, so deep chains cost milliseconds.
    """
    depth = len(inputs[0]) + 1
    p = torch.tensor(inputs, dtype=torch.float64)  # (P, L-1)
    q = torch.tensor(outputs, dtype=torch.float64)  # (Q, L-1)
    a = torch.cumprod(torch.cat([torch.ones(len(p), 1, dtype=p.dtype), p[:, :-1]], 1), 1)  # (P, L-1) a_ℓ
    d = torch.flip(torch.cumprod(torch.flip(q, [1]), 1), [1])  # (Q, L-1) d_ℓ
    inner_p = (a * p)[:, 1:]  # (P, L-2): a_ℓ p_ℓ for the middle factors ℓ = 1 … L-2
    inner_q = (d[:, 1:] * q[:, :-1]) if depth > 2 else d[:, 1:]  # (Q, L-2): d_ℓ q_{ℓ-1}
    quad = inner_q @ inner_p.T  # (Q, P)
    lin = m * p[None, :, 0] + n * q[:, None, -1]  # (Q, P)
    root = (-lin + (lin.square() + 4 * quad * max_params).sqrt()) / (2 * quad.clamp_min(1e-300))
    rank = torch.where(quad > 0, root, max_params / lin).floor().clamp(1, min(m, n)).to(torch.int64)
    quad, lin = quad.round().to(torch.int64), lin.round().to(torch.int64)
    params = quad * rank.square() + lin * rank
    over = params > max_params  # float rounding: one rank lower
    rank = torch.where(over & (rank > 1), rank - 1, rank)
    params = quad * rank.square() + lin * rank
    fits = (params <= max_params).nonzero().tolist()
    params, rank = params.tolist(), rank.tolist()
    return [(params[i][j], inputs[j], outputs[i], rank[i][j]) for i, j in fits]


def budget_chains(m: int, n: int, depth: int, max_params: int) -> list[Chain]:
    """Chains of ``depth`` factors with one rank ``r`` at every split, the largest ``r``
    that fits ``max_params``, for every choice of non-trivial splits
    (``p_ℓ, q_ℓ >= 2``, so every factor is truly sparse); most parameters first.

    ``search_chains`` enumerates every rank combination, which explodes past depth 2
    for real layer sizes (millions of chains for 1536×384 at depth 3); a uniform rank
    keeps one candidate per split structure, which is what a parameter budget needs.
    ``budget_patterns`` gives the same list without building the chains.
    """
    return [Chain.of(*patterns) for _, patterns in budget_patterns(m, n, depth, max_params)]


def budget_patterns(
    m: int, n: int, depth: int, max_params: int, fill: float = 0.0
) -> list[tuple[int, tuple[tuple[int, int, int, int], ...]]]:
    """``(params, patterns)`` of every chain ``budget_chains`` returns with at least
    ``fill`` times the most parameters, in its order, as plain tuples: the tens of
    thousands of chains at depth 6 for 1024×1024 cost a fraction of a second this
    way, and a caller builds only those it keeps."""
    if depth < 1:
        raise PatternError(f"depth must be >= 1, got {depth}; a chain needs at least one factor")
    splits = depth - 1
    # non-trivial splits only (p_ℓ, q_ℓ >= 2), enumerated as such: filtering all
    # factorizations afterwards took minutes at depth 10 for 1024x1024
    outputs = list(_ordered_factorizations(m, splits, least=2))  # q
    inputs = list(_ordered_factorizations(n, splits, least=2))  # p
    if not splits:
        sized = [(m * n, (), (), 1)] if m * n <= max_params else []
    elif outputs and inputs:
        sized = _uniform_ranks(m, n, inputs, outputs, max_params)
    else:
        sized = []
    if not sized:
        raise PatternError(
            f"no chain of depth {depth} fits a {m}x{n} matrix in {max_params} parameters; "
            "raise the budget or lower the depth"
        )
    most = max(size for size, *_ in sized)
    found = [
        (size, _split_patterns(m, n, p, q, [rank] * splits))
        for size, p, q, rank in sized
        if size >= fill * most
    ]
    return sorted(found, key=lambda item: (-item[0], " ".join("({},{},{},{})".format(*t) for t in item[1])))


def _split_patterns(
    m: int, n: int, p: Sequence[int], q: Sequence[int], r: Sequence[int]
) -> tuple[tuple[int, int, int, int], ...]:
    """The patterns ``chain_from_splits`` builds, as tuples (no validation)."""
    depth = len(p) + 1
    a = [math.prod(p[:i]) for i in range(depth)]
    d = [math.prod(q[i:]) for i in range(depth)]
    b = [m // d[0]] + [q[i] * r[i] for i in range(depth - 1)]
    c = [p[i] * r[i] for i in range(depth - 1)] + [n // a[-1]]
    return tuple(zip(a, b, c, d))
