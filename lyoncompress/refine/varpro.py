"""Monarch + low rank by variable projection, and the search over its geometry.

The structure is a two-factor chain ``X_1 X_2`` with ``p`` input-side and ``q``
output-side blocks and KS rank ``r`` (``chain_from_splits(m, n, [p], [q], [r])``:
``X_1 = (1, m/q, p·r, q)``, ``X_2 = (p, q·r, n/p, 1)``, ``r·(m·p + n·q)``
parameters) plus a rank-``R`` term ``U V``. Written ``W ≈ A Z`` with
``A = [X_1, U]`` (``m × s``) and ``Z = [X_2; V]`` (``s × n``, ``s = p·q·r + R``), the
loss ``‖(W - A Z) L‖_F²`` (``L L^T = G``, the damped calibration second moment) is,
for a fixed ``Z``, an ordinary least-squares problem in ``A`` that splits by output
group: row ``(j, k)`` of ``X_1`` only meets rows ``(l, k)`` of ``X_2``, and every row
of ``U`` meets all of ``V``. So ``A`` is solved exactly (``q`` solves of size
``p·r + R``) inside the objective, and L-BFGS moves only ``Z``: variable projection.
By the envelope theorem the gradient of ``min_A loss(A, Z)`` is the partial gradient
at the solved ``A``, so one backward pass through ``A Z L`` gives it.

The geometry (``p``, ``q``, ``r``, ``R``) matters as much as the optimiser: on
MiniLM many small blocks with a small KS rank and a large low-rank term win.
``search_geometry`` ranks a grid of them at one budget by a short fit and fits the
best few in full. The held-out error is checked along the way and the best state
seen is kept, the start included, so a fit is never worse than its start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain, chain_from_splits
from lyoncompress.errors import InputError
from lyoncompress.factorization.projection import check_matrix
from lyoncompress.refine.aware import activation_aware_lowrank, activation_aware_projection
from lyoncompress.refine.gram import Whitening, check_gram, output_energy, output_error

# L-BFGS iterations that rank each geometry. Short screens favour the geometries with
# more low rank, which converge faster (MiniLM query: 16x16 r3 + 48 is 1.07x AA-SVD
# after 15, 0.89x after 300, against 1.03x / 0.94x for 6x6 r2 + 84), so the grid only
# holds the Monarch shares that won most full fits; within it, on MiniLM layer 0 at 50%,
# 8 iterations rank the 300-iteration winners (8x32 r4 + 102, 24x6 r8 + 76) 1st or 2nd
SCREEN_ITERATIONS = 8
FINALISTS = 1  # geometries fitted in full
MONARCH_SHARES = (0.35, 0.5)  # budget shares tried for the Monarch part (0.2 left out for time)
PATIENCE = 20  # a full fit stops once this many iterations gain < MIN_GAIN on held-out rows
MIN_GAIN = 5e-3
BLOCK_RANGE = (0.4, 1.25)  # input-side block counts p tried: BLOCK_RANGE · √n
_RIDGE = 1e-12  # ridge of the unit-diagonal inner normal equations (keeps them SPD, far below any error)


@dataclass(frozen=True)
class Geometry:
    """``p`` input-side blocks, ``q`` output-side blocks, KS rank ``r``, low rank ``R``."""

    inputs: int
    outputs: int
    rank: int
    lowrank: int

    def chain(self, m: int, n: int) -> Chain:
        return chain_from_splits(m, n, [self.inputs], [self.outputs], [self.rank])

    def params(self, m: int, n: int) -> int:
        return self.rank * (m * self.inputs + n * self.outputs) + self.lowrank * (m + n)

    def __str__(self) -> str:
        return f"{self.inputs}x{self.outputs} blocks, KS rank {self.rank} + low rank {self.lowrank}"


@dataclass(frozen=True)
class VarProResult:
    """Fitted ``chain`` twiddles and ``[U (1, 1, m, R), V (1, 1, R, n)]`` (``[]`` when
    ``R = 0``), held-out errors of the start and of the kept state, iterations run."""

    chain: Chain
    twiddles: list[torch.Tensor]
    lowrank_twiddles: list[torch.Tensor]
    err_before: float
    err_after: float
    iterations: int


@dataclass(frozen=True)
class Tried:
    """One geometry of a search: its held-out error after ``iterations`` L-BFGS steps."""

    geometry: Geometry
    params: int
    val_error: float
    iterations: int


@dataclass(frozen=True)
class SearchResult:
    """The best full fit and every geometry tried (screened and full), best first."""

    best: VarProResult
    geometry: Geometry
    tried: list[Tried]


def hybrid_geometries(m: int, n: int, max_params: int) -> list[Geometry]:
    """The grid ``search_geometry`` ranks for an ``m × n`` weight within ``max_params``.

    Input-side block counts ``p | n`` near ``√n`` (``BLOCK_RANGE · √n``), each with the
    ``q = p·m/n`` that gives both factors the same size (``q = p`` when that does not
    divide); for each, the KS ranks whose Monarch part is closest to each of
    ``MONARCH_SHARES`` of the budget, and the largest low rank that fills the rest.
    """
    root = math.sqrt(n)
    found: set[Geometry] = set()
    low, high = BLOCK_RANGE
    for p in (k for k in range(2, n // 2 + 1) if n % k == 0 and low * root <= k <= high * root):
        q = p * m // n if (p * m) % n == 0 else p
        if q < 2 or m % q or q > m // 2:
            continue
        per_rank = m * p + n * q
        for share in MONARCH_SHARES:
            r = max(1, round(share * max_params / per_rank))
            r = min(r, (m // q), (n // p))
            lowrank = min((max_params - r * per_rank) // (m + n), m, n)
            if r * per_rank <= max_params and lowrank >= 0:
                found.add(Geometry(p, q, r, lowrank))
    return sorted(found, key=lambda g: (g.inputs, g.outputs, g.rank))


def hybrid_start(
    weight: torch.Tensor, geometry: Geometry, gram: torch.Tensor
) -> tuple[Chain, list[torch.Tensor], list[torch.Tensor]]:
    """Activation-aware projection onto the geometry's chain, then the activation-aware
    SVD of the residual (``[]`` when ``R = 0``)."""
    m, n = weight.shape
    chain = geometry.chain(m, n)
    twiddles = activation_aware_projection(weight, chain, gram)
    if not geometry.lowrank:
        return chain, twiddles, []
    residual = weight - chain.to_dense(twiddles)
    return chain, twiddles, activation_aware_lowrank(residual, gram, geometry.lowrank)


class _VarPro:
    """The variable-projection problem of one layer in the whitened metric, computed in
    float64 for a float64 weight and in float32 otherwise (half the time; the held-out
    checks that pick the kept state are float64 either way).

    Nothing is done on dense ``m × s`` or ``s × n`` products. ``Z L`` costs
    ``(q·r + R)·n²`` (``X_2`` is block diagonal) instead of ``s·n²``; group ``k`` of ``A``
    meets only ``c + R`` rows of ``Z L`` (``m·(c + R)·n`` for all groups instead of
    ``m·s·n``); and the normal matrix of group ``k`` is assembled from blocks: the
    Monarch block from ``X_2 G X_2^T``, whose blocks are ``n/p`` wide, the low-rank block
    ``V G V^T`` once for all groups. On MiniLM's 384x1536 and 1536x384 matrices that is
    5-40x less work per evaluation than the dense products."""

    def __init__(self, weight: torch.Tensor, chain: Chain, rank: int, whitening: Whitening) -> None:
        first, last = chain.patterns
        if len(chain) != 2 or first.a != 1 or last.d != 1:
            raise InputError(f"variable projection needs a two-factor chain (1,b,c,q)(p,b,c,1), got {chain}")
        self.rank = rank
        self.m, self.n = weight.shape
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.ridge = max(_RIDGE, 100 * torch.finfo(self.dtype).eps)
        self.chol = whitening.chol.to(self.dtype)  # (n, n)
        _, b, c, q = first.as_tuple()  # X_1 twiddle (1, q, b, c): row (j, k) meets rows (l, k) of Z
        self.b, self.c, self.q = b, c, q
        self.blocks = p = last.a  # X_2: p diagonal blocks, each (q·r, n/p)
        self.ks_rank = c // p
        self.chol_blocks = self.chol.reshape(p, self.n // p, self.n)  # (p, n/p, n): rows of L per block
        self.gram_blocks = whitening.gram.to(self.dtype).reshape(p, self.n // p, self.n)  # (p, n/p, n)
        target = weight.to(self.dtype) @ self.chol  # (m, n) = W L
        self.scale = float(target.square().sum().clamp_min(1e-300))
        self.target = target.reshape(b, q, self.n).transpose(0, 1).contiguous()  # (q, b, n) = T_k

    def whitened(self, outer: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Z L`` as the rows each group sees, ``(q, c, n)``, and ``V L`` (``R × n``), which
        every group sees; block ``i`` of ``X_2`` meets only rows ``i`` of ``L``."""
        zl = torch.einsum("ijl,iln->ijn", outer[0][:, 0], self.chol_blocks)  # (p, q·r, n)
        structured = zl.reshape(self.c, self.q, self.n).transpose(0, 1)  # (q, c, n): rows (l, k)
        low = outer[1] @ self.chol if self.rank else zl.new_zeros(0, self.n)  # (R, n)
        return structured, low

    def _normal(self, x2: torch.Tensor, structured: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``D_k D_k^T`` (``q × (c + R) × (c + R)``) for the rows ``D_k`` group ``k`` sees."""
        p, r, q, width = self.blocks, self.ks_rank, self.q, self.n // self.blocks
        tw = x2[:, 0]  # (p, q·r, n/p)
        xg = torch.einsum("ijl,iln->ijn", tw, self.gram_blocks)  # (p, q·r, n) = X_2 G
        xg = xg.reshape(p, r, q, p, width)  # (i, t, k, i', column within block i')
        ks = torch.einsum("itkal,aukl->kitau", xg, tw.reshape(p, r, q, width))  # (q, p, r, p, r)
        ks = ks.reshape(q, self.c, self.c)
        if not self.rank:
            return ks
        cross = structured @ low.T  # (q, c, R)
        lowlow = (low @ low.T).expand(q, -1, -1)  # (q, R, R)
        return torch.cat([torch.cat([ks, cross], 2), torch.cat([cross.transpose(1, 2), lowlow], 2)], 1)

    def predict(self, coef: torch.Tensor, structured: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``C_k D_k`` for every group: ``(q, b, n)``."""
        return coef[..., : self.c] @ structured + coef[..., self.c :] @ low

    def coefficients(self, x2: torch.Tensor, structured: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The exact ``A`` for ``Z`` as per-group coefficients ``C_k`` (``q × b × (c + R)``):
        ``min ‖T_k - C_k D_k‖`` with ``D_k`` the rows of ``Z L`` group ``k`` sees, by the
        column-scaled normal equations and one step of iterative refinement on the
        residual (which brings them to QR's accuracy at a fraction of its cost: without it
        the squared condition number stalls the fit near an exact solution)."""
        with torch.no_grad():
            gram = self._normal(x2, structured, low)  # (q, c + R, c + R)
            scale = torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()  # (q, c + R)
            scale = scale.clamp_min(torch.finfo(self.dtype).tiny)
            outer = scale[:, :, None] * scale[:, None, :]  # (q, c + R, c + R)
            gram = gram / outer + self.ridge * torch.eye(gram.shape[-1], dtype=self.dtype)
            # one inverse per evaluation: batched products are far faster than q small
            # triangular solves, and the refinement step absorbs its rounding
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram)) / outer

            def project(residual: torch.Tensor) -> torch.Tensor:  # (q, b, n) -> (q, b, c + R)
                return torch.cat([residual @ structured.transpose(1, 2), residual @ low.T], 2) @ inverse

            coef = project(self.target)
            return coef + project(self.target - self.predict(coef, structured, low))

    def loss(self, coef: torch.Tensor, structured: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``‖(W - A Z) L‖_F² / ‖W L‖_F²``, group by group."""
        return (self.target - self.predict(coef, structured, low)).square().sum() / self.scale

    def factors(
        self, coef: torch.Tensor, outer: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Chain twiddles and ``[U, V]`` of the state ``(C, Z)``."""
        coef = coef.detach()
        x1 = coef[None, :, :, : self.c].contiguous()  # (1, q, b, c): twiddle[0, k, j, l] = C_k[j, l]
        twiddles = [x1, outer[0].detach().clone()]
        if not self.rank:
            return twiddles, []
        u = coef[:, :, self.c :].transpose(0, 1).reshape(1, 1, self.m, self.rank)  # row j·q + k
        return twiddles, [u.contiguous(), outer[1].detach().reshape(1, 1, self.rank, self.n).clone()]


def varpro_fit(
    weight: torch.Tensor,
    chain: Chain,
    twiddles: list[torch.Tensor],
    lowrank_twiddles: list[torch.Tensor],
    gram_val: torch.Tensor,
    whitening: Whitening,
    iterations: int = 300,
    eval_every: int = 5,
    val_energy: float | None = None,
    patience: int | None = None,
    min_gain: float = 1e-3,
) -> VarProResult:
    """Fit ``X_1 X_2 + U V`` to ``weight`` in the calibration metric by variable projection.

    Args:
        weight: the dense ``(m, n)`` weight.
        chain: two-factor chain ``(1, m/q, p·r, q) (p, q·r, n/p, 1)``; twiddles its start.
        lowrank_twiddles: the start ``[U, V]`` of the low-rank term, or ``[]``.
        gram_val: held-out ``X^T X``: which state is kept.
        whitening: ``Whitening.of(gram_train)``: the metric that is fitted.
        iterations: L-BFGS iterations (strong Wolfe line search) on ``[X_2, V]``;
            ``X_1`` and ``U`` are solved exactly at every evaluation.
        eval_every: objective evaluations between held-out checks.
        patience: stop early once ``patience`` iterations lower the best held-out
            error by less than a relative ``min_gain`` (None: run all ``iterations``).

    Returns:
        ``VarProResult``; ``err_after <= err_before`` always holds.

    Example:
        >>> chain, tw, low = hybrid_start(w, Geometry(8, 8, 1, 4), g_train)
        >>> fit = varpro_fit(w, chain, tw, low, g_val, Whitening.of(g_train), iterations=100)
    """
    check_matrix(weight, "weight")
    m, n = weight.shape
    check_gram(gram_val, n, "gram_val")
    chain.check_twiddles(twiddles)
    rank = lowrank_twiddles[0].shape[-1] if lowrank_twiddles else 0
    problem = _VarPro(weight, chain, rank, whitening)
    energy = output_energy(weight, gram_val) if val_energy is None else val_energy
    dtype = weight.dtype

    def val_error(twiddles: list[torch.Tensor], low: list[torch.Tensor]) -> float:
        dense = chain.to_dense([t.to(torch.float64) for t in twiddles])
        if low:
            dense = dense + low[0][0, 0].to(torch.float64) @ low[1][0, 0].to(torch.float64)
        return output_error(weight, dense, gram_val, energy)

    err_before = val_error(twiddles, lowrank_twiddles)
    best = (err_before, list(twiddles), list(lowrank_twiddles))
    outer = [twiddles[1].detach().to(problem.dtype).clone()]
    if rank:
        outer.append(lowrank_twiddles[1].detach().to(problem.dtype).reshape(rank, n).clone())
    outer = [t.requires_grad_(True) for t in outer]
    evaluations = 0

    def consider(coef: torch.Tensor) -> None:
        nonlocal best
        tw, low = problem.factors(coef, outer)
        err = val_error(tw, low)
        if math.isfinite(err) and err < best[0]:
            best = (err, tw, low)

    def closure() -> torch.Tensor:
        nonlocal evaluations
        structured, low = problem.whitened(outer)
        coef = problem.coefficients(outer[0].detach(), structured.detach(), low.detach())
        loss = problem.loss(coef, structured, low)
        for t in outer:
            t.grad = None
        loss.backward()
        evaluations += 1
        if evaluations == 1 or evaluations % eval_every == 0:
            consider(coef)
        return loss

    ran = 0
    if iterations > 0:
        chunk = iterations if patience is None else min(patience, iterations)
        optimizer = torch.optim.LBFGS(
            outer,
            lr=1.0,
            max_iter=chunk,
            history_size=20,
            tolerance_grad=1e-14,
            tolerance_change=1e-18,
            line_search_fn="strong_wolfe",
        )
        # L-BFGS keeps its history across steps: chunks of ``patience`` iterations are one
        # run that stops once a chunk gains less than ``min_gain`` on held-out rows
        while ran < iterations:
            optimizer.param_groups[0]["max_iter"] = min(chunk, iterations - ran)
            before = best[0]
            optimizer.step(closure)
            done = optimizer.state[outer[0]].get("n_iter", 0)
            if done == ran or best[0] > (1.0 - min_gain) * before:
                ran = done
                break
            ran = done
    else:
        with torch.no_grad():
            consider(problem.coefficients(outer[0].detach(), *problem.whitened(outer)))
    with torch.no_grad():
        consider(problem.coefficients(outer[0].detach(), *problem.whitened(outer)))  # the last state
    err, tw, low = best
    return VarProResult(
        chain,
        [t.to(dtype).contiguous() for t in tw],
        [t.to(dtype).contiguous() for t in low],
        err_before,
        err,
        ran,
    )


def search_geometry(
    weight: torch.Tensor,
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    max_params: int,
    iterations: int = 300,
    screen_iterations: int = SCREEN_ITERATIONS,
    finalists: int = FINALISTS,
    geometries: list[Geometry] | None = None,
    whitening: Whitening | None = None,
    patience: int | None = PATIENCE,
) -> SearchResult | None:
    """The best Monarch + low-rank geometry within ``max_params``, fitted by ``varpro_fit``.

    Every geometry of ``hybrid_geometries`` (or ``geometries``) is started with
    ``hybrid_start`` and ranked by its held-out error after ``screen_iterations``;
    the ``finalists`` best go on to ``iterations`` (stopping early after ``patience``
    iterations without a ``MIN_GAIN`` held-out gain) and the lowest held-out error
    wins. Returns None when no geometry fits.

    Example:
        >>> found = search_geometry(w, g_train, g_val, max_params=w.numel() // 2)
        >>> str(found.geometry), found.best.err_after, [(str(t.geometry), t.val_error) for t in found.tried]
    """
    check_matrix(weight, "weight")
    m, n = weight.shape
    check_gram(gram_train, n, "gram_train")
    grid = hybrid_geometries(m, n, max_params) if geometries is None else geometries
    grid = [g for g in grid if g.params(m, n) <= max_params]
    if not grid:
        return None
    whitening = Whitening.of(gram_train) if whitening is None else whitening
    energy = output_energy(weight, gram_val)

    def fit(geometry: Geometry, steps: int) -> VarProResult:
        chain, twiddles, low = hybrid_start(weight, geometry, gram_train)
        return varpro_fit(
            weight, chain, twiddles, low, gram_val, whitening, steps, val_energy=energy,
            patience=patience, min_gain=MIN_GAIN,
        )  # fmt: skip

    def resume(start: VarProResult) -> VarProResult:  # the screened state goes on: never worse
        rest = max(0, iterations - start.iterations)
        chain, twiddles, low = start.chain, start.twiddles, start.lowrank_twiddles
        more = varpro_fit(
            weight, chain, twiddles, low, gram_val, whitening, rest, val_energy=energy,
            patience=patience, min_gain=MIN_GAIN,
        )  # fmt: skip
        return VarProResult(
            more.chain, more.twiddles, more.lowrank_twiddles, start.err_before, more.err_after,
            start.iterations + more.iterations,
        )  # fmt: skip

    if len(grid) > finalists:
        screened = sorted(((fit(g, screen_iterations), g) for g in grid), key=lambda item: item[0].err_after)
        tried = [Tried(g, g.params(m, n), r.err_after, r.iterations) for r, g in screened]
        full = [(resume(r), g) for r, g in screened[:finalists]]
    else:
        tried, full = [], [(fit(g, iterations), g) for g in grid]
    tried += [Tried(g, g.params(m, n), r.err_after, r.iterations) for r, g in full]
    best, geometry = min(full, key=lambda item: item[0].err_after)
    return SearchResult(best, geometry, sorted(tried, key=lambda t: t.val_error))
