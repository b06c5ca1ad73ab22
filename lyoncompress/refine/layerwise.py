"""Layer-wise refinement: fit a chain (plus an optional low-rank term) to a layer's outputs.

Minimises the relative output error on calibration inputs,
``‖X W^T - X (B + U V)^T‖_F / ‖X W^T‖_F`` with ``B = X_1 … X_L``, through the
whitened form ``‖(W - B - U V) L‖_F`` (``L L^T = X^T X``): one step costs
at most ``n`` products with the chain whatever the number of samples. Since
``G = Σ_j l_j l_j^T`` over the columns of ``L``, Adam steps use a few hundred
columns sampled ∝ ``‖l_j‖²`` (an unbiased estimate of the loss), so wide layers
(``n = 1536``) cost no more per step than narrow ones.

Two kinds of steps:

* exact least squares where the problem is linear: the output-side factor ``X_1``
  together with ``U`` given the rest (rows of ``X_1`` are independent problems,
  one small solve per ``(a, d)`` group), the input-side factor ``X_L`` together
  with ``V`` given the rest (preconditioned conjugate gradients: ``G`` couples all
  its entries), and ``U V`` given the chain (the activation-aware SVD of the
  residual). Alternating the first two is exact alternating least squares for a
  two-factor chain (Monarch, and Monarch + low rank); each sweep is extrapolated
  along its own step when that lowers the loss, which saves about a third of
  the sweeps on MiniLM;
* Adam on every twiddle jointly, for the coupling with middle factors, with a
  per-tensor step size proportional to the tensor's RMS (the projection leaves
  factors at very different scales) and a cosine decay.

The held-out error (on a separate second moment) is measured after each phase
and every ``eval_every`` Adam steps; the best state seen is returned, the start
included, so refinement never makes held-out activations worse.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lyoncompress.butterfly import Chain, lowrank
from lyoncompress.errors import InputError
from lyoncompress.factorization.projection import check_matrix
from lyoncompress.refine.aware import activation_aware_lowrank
from lyoncompress.refine.gram import Whitening, check_gram, output_energy, output_error

# Adam is declared diverged when the training loss exceeds the start by this factor.
_BLOWUP = 1e4
# Alternating least squares stops once a sweep lowers the training loss by less than this.
_SWEEP_TOLERANCE = 1e-4
# Conjugate-gradient iterations per solve of the input-side factor, warm-started.
_CG_ITERATIONS = 20


@dataclass(frozen=True)
class RefineResult:
    """Refined twiddles and held-out relative output errors before and after.

    ``lowrank_twiddles`` is ``[U (1, 1, m, r), V (1, 1, r, n)]`` or ``[]``.
    ``diverged`` is True when Adam blew up; the start is then returned unchanged.
    """

    twiddles: list[torch.Tensor]
    lowrank_twiddles: list[torch.Tensor]
    err_before: float
    err_after: float
    diverged: bool


def refine_layer(
    weight: torch.Tensor,
    chain: Chain,
    twiddles: Sequence[torch.Tensor],
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    steps: int = 300,
    sweeps: int = 0,
    lowrank_rank: int = 0,
    lowrank_init: Sequence[torch.Tensor] | None = None,
    lr: float = 3e-2,
    damping: float = 1e-4,
    eval_every: int = 25,
    columns: int = 512,
    whitening: Whitening | None = None,
) -> RefineResult:
    """Refine ``chain`` twiddles (and a rank-``lowrank_rank`` term) on calibration inputs.

    Args:
        weight: the dense ``(m, n)`` weight being replaced.
        chain, twiddles: the start, e.g. ``project(weight, chain).twiddles``.
        gram_train: ``X^T X`` of the calibration inputs that are fitted.
        gram_val: ``X^T X`` of held-out inputs; decides which state is kept.
        steps: Adam steps (0: exact least-squares steps only).
        sweeps: alternating least-squares sweeps before Adam (each solves the
            output-side and the input-side factor exactly); they stop early once a
            sweep gains less than ``_SWEEP_TOLERANCE`` of the training loss.
        lowrank_rank: rank of a low-rank term ``U V`` fitted jointly (0: none).
        lowrank_init: its start ``[U, V]``; default: activation-aware SVD of
            ``weight - chain``.
        lr: Adam step size relative to each tensor's RMS.
        damping: ridge on ``gram_train`` (see ``sqrt_factor``).
        eval_every: Adam steps between held-out checks.
        columns: columns of ``L`` per Adam step (sampled ∝ their norm², an unbiased
            loss), so a step costs ``columns`` chain products instead of ``n``.
        whitening: ``Whitening.of(gram_train, damping)`` when the caller already has it
            (``damping`` is then not used): refining several starts of one layer
            factorises ``gram_train`` once.

    Returns:
        ``RefineResult``; ``err_after <= err_before`` always holds.

    Example:
        >>> start = project(w, monarch(64, 32, 4, 2))
        >>> result = refine_layer(w, start.chain, start.twiddles, gram(x_tr), gram(x_va))
    """
    problem, start = _setup(
        weight, chain, twiddles, gram_train, gram_val, lowrank_rank, lowrank_init, damping, whitening
    )
    err_before = problem.val_error(start)
    best, best_err = start, err_before

    def consider(state: list[torch.Tensor]) -> None:
        nonlocal best, best_err
        err = problem.val_error(state)
        if err < best_err:
            best, best_err = [t.detach().clone() for t in state], err

    state = problem.solve_first_factors(start)
    consider(state)
    state = _alternate(problem, state, sweeps, consider)
    state, diverged = _adam(problem, state, steps, lr, eval_every, columns, consider)
    if diverged:
        return _result(start, lowrank_rank, err_before, err_before, True)
    if lowrank_rank:
        state = problem.fit_lowrank(state)
        consider(state)
    state = problem.solve_first_factors(state)
    consider(state)
    return _result(best, lowrank_rank, err_before, best_err, False)


def least_squares_error(
    weight: torch.Tensor,
    chain: Chain,
    twiddles: Sequence[torch.Tensor],
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    lowrank_init: Sequence[torch.Tensor] | None = None,
    whitening: Whitening | None = None,
) -> float:
    """Held-out relative output error of this start, or after one exact least-squares
    solve of its output-side factor (and ``U``) when that is lower: a few percent of a
    refinement's cost, and what ``choose_structure`` ranks candidate starts by.

    Arguments as in ``refine_layer``; ``lowrank_init`` ``[U, V]`` sets the low-rank term.
    """
    rank = lowrank_init[0].shape[-1] if lowrank_init else 0
    problem, start = _setup(
        weight, chain, twiddles, gram_train, gram_val, rank, lowrank_init, 1e-4, whitening
    )
    return min(problem.val_error(start), problem.val_error(problem.solve_first_factors(start)))


def _setup(
    weight: torch.Tensor,
    chain: Chain,
    twiddles: Sequence[torch.Tensor],
    gram_train: torch.Tensor,
    gram_val: torch.Tensor,
    lowrank_rank: int,
    lowrank_init: Sequence[torch.Tensor] | None,
    damping: float,
    whitening: Whitening | None,
) -> tuple[_Problem, list[torch.Tensor]]:
    """Checked inputs as a ``_Problem`` and its start state (twiddles, then ``U, V``)."""
    check_matrix(weight, "weight")
    m, n = weight.shape
    if chain.shape != (m, n):
        raise InputError(f"chain {chain} has shape {chain.shape} but the weight is {m}x{n}")
    chain.check_twiddles(twiddles)
    check_gram(gram_train, n, "gram_train")
    check_gram(gram_val, n, "gram_val")
    if whitening is None:
        whitening = Whitening.of(gram_train, damping)
    check_gram(whitening.chol, n, "whitening.chol")
    dtype = weight.dtype
    start = [t.detach().to(dtype) for t in twiddles]
    if lowrank_rank:
        if lowrank_init is None:
            lowrank_init = activation_aware_lowrank(weight - chain.to_dense(start), gram_train, lowrank_rank)
        lowrank(m, n, lowrank_rank).check_twiddles(lowrank_init)
        start += [t.detach().to(dtype) for t in lowrank_init]
    elif lowrank_init:
        raise InputError("lowrank_init was given with lowrank_rank=0; pass the rank of the low-rank term")
    return _Problem(weight, chain, lowrank_rank, whitening, gram_val), start


def _result(
    state: list[torch.Tensor], rank: int, before: float, after: float, diverged: bool
) -> RefineResult:
    split = len(state) - 2 if rank else len(state)
    return RefineResult(list(state[:split]), list(state[split:]), before, after, diverged)


class _Problem:
    """The whitened least-squares problem of one layer; a state is the chain's
    twiddles followed by ``[U, V]`` when there is a low-rank term."""

    def __init__(
        self,
        weight: torch.Tensor,
        chain: Chain,
        rank: int,
        whitening: Whitening,
        gram_val: torch.Tensor,
    ) -> None:
        self.weight = weight.detach()
        self.chain = chain
        self.lowrank_chain = lowrank(*weight.shape, rank) if rank else None
        chol = whitening.chol  # (n, n) float64
        self.gram = whitening.gram  # the damped second moment the loss uses
        self.chol = chol
        self.gram_val = gram_val
        self.val_energy = output_energy(weight, gram_val)
        self.chol_t = chol.T.to(weight.dtype)  # (n, n): apply(·, L^T) = (B L)^T
        self.target_t = self.chol_t @ self.weight.T  # (n, m) = (W L)^T
        self.scale = float(self.target_t.square().sum())
        # column j of L is row j of L^T; sampling them ∝ ‖l_j‖² gives unbiased losses
        self.column_weights = self.chol_t.square().sum(dim=1).to(torch.float64)  # (n,)

    def split(self, state: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        k = len(self.chain)
        return list(state[:k]), list(state[k:])

    def dense(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        twiddles, low = self.split(state)
        approx = self.chain.to_dense(twiddles)
        return approx + self.lowrank_chain.to_dense(low) if low else approx

    def loss(self, state: Sequence[torch.Tensor], columns: torch.Tensor | None = None) -> torch.Tensor:
        """``‖(W - B - U V) L‖_F² / ‖W L‖_F²`` (differentiable), or its unbiased
        estimate from the sampled ``columns`` of ``L`` (see ``sample_columns``)."""
        twiddles, low = self.split(state)
        basis, target = self.chol_t, self.target_t  # (n, n), (n, m)
        if columns is not None:
            p = self.column_weights[columns] / self.column_weights.sum()
            reweight = (1 / (len(columns) * p)).sqrt().to(basis.dtype)[:, None]  # (s, 1)
            basis, target = basis[columns] * reweight, target[columns] * reweight  # (s, n), (s, m)
        residual = target - self.chain.apply(twiddles, basis)  # (s, m)
        if low:
            residual = residual - self.lowrank_chain.apply(low, basis)
        return residual.square().sum() / self.scale

    def sample_columns(self, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """``count`` column indices of ``L`` drawn ∝ ‖l_j‖² (None: use all ``n``)."""
        if count >= len(self.column_weights):
            return None
        return torch.multinomial(self.column_weights, count, replacement=True, generator=generator)

    def val_error(self, state: Sequence[torch.Tensor]) -> float:
        with torch.no_grad():
            return output_error(self.weight, self.dense(state), self.gram_val, self.val_energy)

    def fit_lowrank(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Best ``U V`` for the current chain: activation-aware SVD of the residual."""
        twiddles, low = self.split(state)
        with torch.no_grad():
            residual = self.weight - self.chain.to_dense(twiddles)
            rank = low[0].shape[-1]
            return twiddles + activation_aware_lowrank(residual, self.gram, rank, damping=0.0)

    def solve_first_factors(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Exact least squares for ``X_1`` and ``U`` jointly, the rest fixed.

        With ``Q = X_2 … X_L``, row ``(i, j, k)`` of ``X_1`` (pattern ``(a, b, c, d)``)
        only meets rows ``(i, ·, k)`` of ``Q``, so each ``(i, k)`` group is an
        ordinary regression of ``b`` rows of ``W`` on ``c`` rows of ``Q`` plus the
        ``r`` rows of ``V``, in the metric ``G``.
        """
        twiddles, low = self.split(state)
        a, b, c, d = self.chain.patterns[0].as_tuple()
        m, n = self.weight.shape
        with torch.no_grad():
            g = self.gram
            eye = torch.eye(n, dtype=self.weight.dtype, device=g.device)
            rest = Chain(self.chain.patterns[1:]).apply(twiddles[1:], eye).T if len(twiddles) > 1 else eye
            design = rest.to(torch.float64).reshape(a, c, d, n).permute(0, 2, 1, 3)  # (a, d, c, n)
            if low:
                v = low[1].reshape(1, 1, -1, n).to(torch.float64).expand(a, d, -1, n)  # (a, d, r, n)
                design = torch.cat([design, v], dim=2)  # (a, d, c + r, n)
            target = self.weight.to(torch.float64).reshape(a, b, d, n).permute(0, 2, 1, 3)  # (a, d, b, n)
            design_g = design @ g  # (a, d, c + r, n)
            normal = design_g @ design.transpose(-1, -2)  # (a, d, c + r, c + r)
            rhs = target @ design_g.transpose(-1, -2)  # (a, d, b, c + r)
            ridge = 1e-8 * torch.diagonal(normal, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
            normal = normal + ridge[..., None, None] * torch.eye(
                normal.shape[-1], dtype=torch.float64, device=normal.device
            )
            # normal is SPD (ridged): Cholesky, also sidesteps a batched-LU failure seen in MKL
            factor = torch.linalg.cholesky(normal)
            coef = torch.cholesky_solve(rhs.transpose(-1, -2).contiguous(), factor).transpose(
                -1, -2
            )  # (a, d, b, c + r)
            first = coef[..., :c].to(self.weight.dtype).contiguous()  # twiddle (a, d, b, c)
            if not low:
                return [first, *twiddles[1:]]
            u = coef[..., c:].permute(0, 2, 1, 3).reshape(m, -1)  # (a, b, d, r) -> (m, r)
            return [first, *twiddles[1:], u.reshape(1, 1, m, -1).to(self.weight.dtype), low[1]]

    @functools.cached_property
    def gram_inverse(self) -> torch.Tensor:
        """``G^{-1}`` (damped), which preconditions ``solve_last_factors``; only computed
        when sweeps run."""
        return torch.cholesky_inverse(self.chol)

    def solve_last_factors(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Least squares for ``X_L`` and ``V`` jointly, the rest fixed.

        With ``A = [X_1 … X_{L-1}, U]`` and ``Z = [X_L; V]`` the loss is
        ``tr((W - A Z) G (W - A Z)^T)``: ``G`` sits on ``Z``'s input side, so every
        entry of ``Z`` meets every other and no per-block solve exists. The normal
        equations ``P(H Z G) = P(A^T W G)`` (``H = A^T A``, ``P`` the support of
        ``Z``) are solved by conjugate gradients preconditioned with
        ``P(H^{-1} R G^{-1})``, their exact inverse without the support constraint,
        warm-started from the current ``Z``.
        """
        twiddles, low = self.split(state)
        last = self.chain.patterns[-1]
        m, n = self.weight.shape
        with torch.no_grad():
            head = Chain(self.chain.patterns[:-1]).to_dense(twiddles[:-1]).to(torch.float64)  # (m, p)
            mask = last.support().to(self.weight.device, torch.float64)  # (p, n)
            z = last.to_dense(twiddles[-1]).to(torch.float64)
            if low:
                head = torch.cat([head, low[0].reshape(m, -1).to(torch.float64)], dim=1)  # (m, p + r)
                mask = torch.cat(
                    [mask, torch.ones(low[1].shape[-2], n, dtype=torch.float64, device=mask.device)]
                )
                z = torch.cat([z, low[1].reshape(-1, n).to(torch.float64)])  # (p + r, n)
            h = head.T @ head
            # ridged for the preconditioner only: [X_1…, U] can have more columns than rows
            ridge = 1e-8 * float(torch.diagonal(h).mean().clamp_min(1e-300))
            h_inverse = torch.cholesky_inverse(
                torch.linalg.cholesky(h + ridge * torch.eye(len(h), dtype=h.dtype, device=h.device))
            )
            g, g_inverse = self.gram, self.gram_inverse

            def normal(x: torch.Tensor) -> torch.Tensor:
                return mask * (h @ x @ g)

            def precondition(x: torch.Tensor) -> torch.Tensor:
                return mask * (h_inverse @ x @ g_inverse)

            residual = mask * (head.T @ self.weight.to(torch.float64) @ g) - normal(z)
            step = precondition(residual)
            direction, rz = step, float((residual * step).sum())
            for _ in range(_CG_ITERATIONS):
                if rz <= 0:
                    break  # converged to round-off
                applied = normal(direction)
                alpha = rz / float((direction * applied).sum())
                z, residual = z + alpha * direction, residual - alpha * applied
                step = precondition(residual)
                rz, previous = float((residual * step).sum()), rz
                direction = step + (rz / previous) * direction
            inner = last.shape[0]
            dtype = self.weight.dtype
            solved = [*twiddles[:-1], last.from_dense(z[:inner]).to(dtype)]
            if not low:
                return solved
            return [*solved, low[0], z[inner:].reshape(1, 1, -1, n).to(dtype)]


def _alternate(
    problem: _Problem,
    state: list[torch.Tensor],
    sweeps: int,
    consider: Callable[[list[torch.Tensor]], None],
) -> list[torch.Tensor]:
    """Alternating least squares on the first and last factors, with extrapolation.

    After a sweep ``old -> new``, ``new + beta (new - old)`` is tried and kept when
    its training loss is lower; ``beta`` grows after a success and shrinks after a
    failure (the usual line-search acceleration of alternating least squares,
    whose plain steps crawl along the valleys a bilinear fit has).
    """
    if sweeps <= 0 or len(problem.chain) < 2:
        return state
    with torch.no_grad():
        loss = float(problem.loss(state))
        beta = 1.0
        for _ in range(sweeps):
            old = state
            state = problem.solve_last_factors(problem.solve_first_factors(state))
            new_loss = float(problem.loss(state))
            trial = [t + beta * (t - o) for t, o in zip(state, old)]
            trial_loss = float(problem.loss(trial))
            if trial_loss < new_loss:
                state, new_loss, beta = trial, trial_loss, beta * 1.5
            else:
                beta = max(beta / 2, 0.25)
            if not math.isfinite(new_loss):
                return old
            consider(state)
            if loss - new_loss < _SWEEP_TOLERANCE * loss:
                break
            loss = new_loss
    return state


def _adam(
    problem: _Problem,
    state: list[torch.Tensor],
    steps: int,
    lr: float,
    eval_every: int,
    columns: int,
    consider: Callable[[list[torch.Tensor]], None],
) -> tuple[list[torch.Tensor], bool]:
    """Adam with per-tensor step sizes ``lr · RMS(tensor)`` and a cosine decay, each
    step on ``columns`` sampled columns of ``L``. Returns the last state and whether
    the loss blew up (NaN/Inf or ``_BLOWUP``× the start)."""
    if steps <= 0:
        return state, False
    params = [t.detach().clone().requires_grad_(True) for t in state]
    rms = [float(p.detach().square().mean().sqrt()) for p in params]
    fallback = max(rms) or 1.0  # a zero tensor moves at the scale of the others
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr * (s or fallback)} for p, s in zip(params, rms)])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    with torch.no_grad():
        first_loss = float(problem.loss(params))
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(params, problem.sample_columns(columns, generator))
        value = float(loss.detach())
        if not math.isfinite(value) or value > _BLOWUP * max(first_loss, 1e-30):
            return state, True
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            consider([p.detach() for p in params])
    return [p.detach() for p in params], False
