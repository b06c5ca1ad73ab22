"""Quantized butterflies: product error of each rescaling relative to round-to-nearest.

Every ratio divides two errors measured in this run on the same factors:
``‖X_1…X_L - X̂_1…X̂_L‖_F / ‖X_1…X_L‖_F`` for the rescaling over the same for RTN
(``none``). Factors are i.i.d. Gaussian. Prints a markdown table with the target
and whether it is met.

    .venv/bin/python benchmarks/quantize.py [float growth int learned speed]

(no argument: every section).
"""

from __future__ import annotations

import math
import platform
import sys
import time

import torch

from lyoncompress.butterfly import Chain, chain_from_splits, monarch, square_butterfly
from lyoncompress.quantization import get_format, quantize_chain, solve_rank_one
from lyoncompress.quantization.diagonal import Job, cols, rows, scale_cols, scale_rows
from lyoncompress.quantization.formats import round_significand
from lyoncompress.quantization.rescale import left_to_right

F64 = torch.float64


def gaussian(chain: Chain, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.twiddle_shape, generator=gen, dtype=F64) for p in chain.patterns]


def rebalanced(chain: Chain, twiddles: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """The same product with a random log-normal (σ = 1) diagonal between each pair of factors."""
    gen = torch.Generator().manual_seed(seed)
    out = list(twiddles)
    for i, (left, right) in enumerate(zip(chain.patterns, chain.patterns[1:])):
        s = torch.randn(left.a * left.c * left.d, generator=gen, dtype=F64).exp()
        out[i], out[i + 1] = scale_cols(left, out[i], s), scale_rows(right, out[i + 1], 1 / s)
    return out


def product_error(chain: Chain, twiddles: list[torch.Tensor], fmt: str, rescale: str, group=None) -> float:
    weight = chain.to_dense(twiddles)
    q = quantize_chain(chain, twiddles, fmt, rescale=rescale, group_size=group)
    return float(torch.linalg.norm(chain.to_dense(q.dequantized(F64)) - weight) / weight.norm())


def _error(chain: Chain, twiddles: list[torch.Tensor], t: int, method: str | None) -> float:
    if method is None:
        return unweighted_error(chain, twiddles, t)
    return product_error(chain, twiddles, f"float:t{t}", method)


def unweighted_error(chain: Chain, twiddles: list[torch.Tensor], t: int) -> float:
    """``left-to-right`` as it was before the prefix weights (the baseline of the growth rows)."""
    job = Job(chain=chain, fmt=get_format(f"float:t{t}"), group_size=None, calib=None)
    found = left_to_right(job, twiddles, weigh_prefix=False)
    weight = chain.to_dense(twiddles)
    quantized = chain.to_dense([round_significand(x, t) for x in found.twiddles])
    return float(torch.linalg.norm(quantized - weight) / weight.norm())


ROWS: list[tuple[str, str, str, float, str, bool | None]] = []


def row(case: str, fmt: str, method: str, value: float, target: str, met: bool | None) -> None:
    ROWS.append((case, fmt, method, value, target, met))


def ratio_rows(name: str, chain: Chain, ts, methods: dict[str, tuple[float | None, int]]) -> None:
    """methods: rescaling -> (max ratio vs RTN or None, smallest t the target applies to)."""
    tw = gaussian(chain)
    for t in ts:
        fmt = f"float:t{t}"
        base = product_error(chain, tw, fmt, "none")
        row(name, fmt, "none (RTN) rel. error", base, "", None)
        for method, (limit, from_t) in methods.items():
            r = product_error(chain, tw, fmt, method) / base
            applies = limit is not None and t >= from_t
            row(
                name,
                fmt,
                f"{method} / RTN",
                r,
                f"<= {limit}" if applies else "",
                r <= limit if applies else None,
            )


def float_rows() -> None:
    for n in (256, 1024):
        chain = square_butterfly(n, 2)
        tw = gaussian(chain)
        for t, limit in ((4, 0.25), (6, None), (8, 0.12)):
            fmt = f"float:t{t}"
            base = product_error(chain, tw, fmt, "none")
            row(f"radix-2 N={n} L={len(chain)}", fmt, "none (RTN) rel. error", base, "", None)
            r = product_error(chain, tw, fmt, "left-to-right") / base
            row(
                f"radix-2 N={n}",
                fmt,
                "left-to-right / RTN",
                r,
                f"<= {limit}" if limit else "",
                None if limit is None else r <= limit,
            )
            r = unweighted_error(chain, tw, t) / base
            row(f"radix-2 N={n}", fmt, "left-to-right without prefix weights / RTN", r, "", None)
            r = product_error(chain, tw, fmt, "descent") / base
            row(f"radix-2 N={n}", fmt, "descent / RTN", r, "", None)
            r = product_error(chain, tw, fmt, "pairwise") / base
            row(f"radix-2 N={n}", fmt, "pairwise / RTN", r, "", None)
    for n in (256, 1024):
        ratio_rows(
            f"radix-4 N={n}",
            square_butterfly(n, 4),
            (4, 6, 8),
            {"left-to-right": (0.5, 6), "descent": (None, 0)},
        )
    ratio_rows("Monarch 256, 16 blocks", monarch(256, 256, 16), (4, 6, 8), {"optimal": (0.75, 0)})
    ratio_rows("Monarch 1024, 32 blocks", monarch(1024, 1024, 32), (4, 6, 8), {"optimal": (0.75, 0)})
    flip_rows()


def _flip_towards_x(x: torch.Tensor, x_hat: torch.Tensor, lam: torch.Tensor, t: int) -> torch.Tensor:
    """Greedy post-pass: move the entry of each ``x̂`` whose other grid neighbour of ``λx`` raises
    ``cos(x, x̂)`` the most to that neighbour, until no move raises it (all rows at once)."""
    v = lam[:, None] * x  # (B, m)
    ulp = torch.exp2((torch.frexp(v)[1] - t).to(v.dtype))
    low = torch.floor(v / ulp) * ulp
    for _ in range(x.shape[1]):
        other = torch.where(x_hat == low, low + ulp, low)  # (B, m)
        dot, norm2 = (x * x_hat).sum(-1, keepdim=True), (x_hat * x_hat).sum(-1, keepdim=True)
        step = other - x_hat
        gain = (dot + x * step) ** 2 / (norm2 + 2 * x_hat * step + step**2) - dot**2 / norm2  # (B, m)
        best = gain.argmax(-1, keepdim=True)
        move = (gain.gather(-1, best) > 1e-12 * dot**2 / norm2) & (torch.arange(x.shape[1]) == best)
        if not move.any():
            break
        x_hat = torch.where(move, other, x_hat)
    return x_hat


def flip_rows() -> None:
    """Monarch 1024/32 at t=4 over 4 seeds: ``optimal`` against a coordinate-flip post-pass that
    raises cos(x, x̂) after the λ search (then ŷ = fl(μy), μ = ⟨x, x̂⟩/‖x̂‖²). On two factors the
    rank-one blocks of a Monarch product are disjoint, so ``optimal`` is the optimum over every
    pair of float:t4 factors (tests: brute force) and no post-pass can beat it."""
    t, chain = 4, monarch(1024, 1024, 32)
    for seed in range(4):
        tw = gaussian(chain, seed)
        x, y = cols(chain.patterns[0], tw[0]), rows(chain.patterns[1], tw[1])  # (1024, 32) each
        base = product_error(chain, tw, "float:t4", "none")
        sol = solve_rank_one(x, y, t)
        x_hat = _flip_towards_x(x, round_significand(sol.lam[:, None] * x, t), sol.lam, t)
        mu = (x * x_hat).sum(-1) / (x_hat * x_hat).sum(-1)
        y_hat = round_significand(mu[:, None] * y, t)
        flipped = float((x[:, :, None] * y[:, None] - x_hat[:, :, None] * y_hat[:, None]).square().sum())
        flipped = (flipped / float(chain.to_dense(tw).square().sum())) ** 0.5
        name = f"Monarch 1024, 32 blocks, seed {seed}"
        row(
            name,
            "float:t4",
            "optimal / RTN",
            product_error(chain, tw, "float:t4", "optimal") / base,
            "",
            None,
        )
        row(name, "float:t4", "optimal + cos flips / RTN", flipped / base, "<= 0.75", flipped / base <= 0.75)


GROWTH_SEEDS = 8


def growth_rows() -> None:
    """Error growth with depth at fixed t: L=6 (N=64) -> L=10 (N=1024).

    Seed 0 alone (the second block) is noisy: every entry of a butterfly product is one
    product of L Gaussian twiddles, so a few large entries dominate the norm, and the
    growth of left-to-right ranged 0.79-1.53 over seeds 0-3. The means over
    ``GROWTH_SEEDS`` seeds are the rows to judge by."""
    for t in (4, 8):
        fmt = f"float:t{t}"
        methods = {  # label -> rescaling (None: left-to-right without prefix weights)
            "RTN": "none",
            "left-to-right without prefix weights": None,
            "left-to-right": "left-to-right",
            "descent": "descent",
            "feedback": "feedback",
        }
        for seeds in (range(GROWTH_SEEDS), range(1)):
            case = (
                f"growth L=6 -> L=10, mean of {len(seeds)} seeds"
                if len(seeds) > 1
                else "growth L=6 -> L=10, seed 0"
            )
            for label, method in methods.items():
                if label == "feedback" and len(seeds) > 1:
                    continue  # seconds per N=1024 chain; its seed-0 row is enough to place it
                errs = []
                for n in (64, 1024):
                    chain = square_butterfly(n)
                    errs.append(
                        sum(_error(chain, gaussian(chain, seed), t, method) for seed in seeds) / len(seeds)
                    )
                growth = errs[1] / errs[0]
                judged = label in ("left-to-right", "descent")
                row(case, fmt, f"{label} err(L=6)", errs[0], "", None)
                row(case, fmt, f"{label} err(L=10)", errs[1], "", None)
                row(
                    case,
                    fmt,
                    f"{label} err(L=10)/err(L=6)",
                    growth,
                    "<= 1.2" if judged else "",
                    growth <= 1.2 if judged else None,
                )


def probe_error(
    chain: Chain, twiddles: list[torch.Tensor], fmt: str, rescale: str, group, seed: int = 7
) -> float:
    """Output error on 256 fresh Gaussian inputs the rescalings never saw."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, chain.shape[1], generator=gen, dtype=F64)
    q = quantize_chain(chain, twiddles, fmt, rescale=rescale, group_size=group)
    ref = chain.apply(twiddles, x)
    return float((chain.apply(q.dequantized(F64), x) - ref).norm() / ref.norm())


def int_rows() -> None:
    """Integer formats: equalisation + per-index search / error feedback vs per-factor RTN."""
    int_cases = [
        ("radix-2 N=1024", square_butterfly(1024), "int8", None),
        ("radix-2 N=1024", square_butterfly(1024), "int4", None),
        ("Monarch 4096, 32 blocks", monarch(4096, 4096, 32), "int4", 32),
        ("(1,256,128,4)(8,64,128,1)", chain_from_splits(1024, 1024, [8], [4], [16]), "int4", 32),
        ("(1,256,128,4)(8,64,128,1)", chain_from_splits(1024, 1024, [8], [4], [16]), "int4", 128),
        ("(1,256,128,4)(8,64,128,1)", chain_from_splits(1024, 1024, [8], [4], [16]), "int8", None),
    ]
    ours = "equalize+auto"  # the default for int formats
    for name, chain, fmt, group in int_cases:
        label = fmt if group is None else f"{fmt} g{group}"
        tw = gaussian(chain)
        skew = rebalanced(chain, tw)
        base = product_error(chain, tw, fmt, "none", group)
        row(name, label, "RTN rel. error (balanced)", base, "", None)
        for method in ("equalize+left-to-right", "equalize+feedback"):
            ratio = base / product_error(chain, tw, fmt, method, group)
            row(name, label, f"RTN / {method} (balanced)", ratio, "", None)
        mine = product_error(chain, tw, fmt, ours, group)
        row(name, label, f"RTN / {ours} (balanced)", base / mine, ">= 2", base / mine >= 2)
        held = probe_error(chain, tw, fmt, ours, group) / probe_error(
            chain, tw, fmt, "equalize+left-to-right", group
        )
        row(name, label, f"held-out probes: {ours} / equalize+left-to-right", held, "<= 1", held <= 1)
        skew_base = product_error(chain, skew, fmt, "none", group)
        skew_mine = product_error(chain, skew, fmt, ours, group)
        row(name, label, "RTN re-balanced / RTN balanced (reference)", skew_base / base, "", None)
        row(
            name,
            label,
            f"{ours}: re-balanced / balanced",
            skew_mine / mine,
            "<= 1.3",
            skew_mine / mine <= 1.3,
        )


def learned_rows() -> None:
    """Learned rescalings on a small chain (Gaussian probes as calibration)."""
    chain = square_butterfly(256)
    tw = gaussian(chain)
    for fmt in ("float:t4", "int4"):
        start = product_error(chain, tw, fmt, "left-to-right")
        t0 = time.perf_counter()
        learned = product_error(chain, tw, fmt, "learned")
        row(
            "radix-2 N=256",
            fmt,
            f"learned / left-to-right ({time.perf_counter() - t0:.1f} s)",
            learned / start,
            "<= 1",
            learned / start <= 1,
        )


def speed_rows() -> None:
    """Speed: N=4096, L=12."""
    chain = square_butterfly(4096)
    tw = gaussian(chain)
    for t in (4, 8):
        wall = cpu = math.inf
        for _ in range(3):  # best of 3: the 2-core machine is shared
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_chain(chain, tw, f"float:t{t}", rescale="left-to-right")
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        row("radix-2 N=4096 L=12", f"float:t{t}", "left-to-right wall time [s]", wall, "< 2", wall < 2)
        row("radix-2 N=4096 L=12", f"float:t{t}", "left-to-right CPU time, all threads [s]", cpu, "", None)
        t0 = time.perf_counter()
        quantize_chain(chain, tw, f"float:t{t}", rescale="descent")
        row("radix-2 N=4096 L=12", f"float:t{t}", "descent wall time [s]", time.perf_counter() - t0, "", None)
    t0 = time.perf_counter()
    quantize_chain(chain, tw, "int4", rescale="equalize+auto")
    row("radix-2 N=4096 L=12", "int4", "equalize+auto wall time [s]", time.perf_counter() - t0, "", None)


SECTIONS = {
    "float": float_rows,
    "growth": growth_rows,
    "int": int_rows,
    "learned": learned_rows,
    "speed": speed_rows,
}


def main() -> None:
    torch.manual_seed(0)
    chosen = sys.argv[1:] or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    for name in chosen:
        SECTIONS[name]()

    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}")
    print()
    print("| case | format | measure | value | target | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, fmt, method, value, target, met in ROWS:
        verdict = "" if met is None else ("yes" if met else "**no**")
        print(f"| {case} | {fmt} | {method} | {value:.4g} | {target} | {verdict} |")


if __name__ == "__main__":
    main()
