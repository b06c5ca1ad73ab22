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
from lyoncompress.quantization import quantize_chain
from lyoncompress.quantization.diagonal import scale_cols, scale_rows

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
            r = product_error(chain, tw, fmt, "pairwise") / base
            row(f"radix-2 N={n}", fmt, "pairwise / RTN", r, "", None)
    for n in (256, 1024):
        ratio_rows(f"radix-4 N={n}", square_butterfly(n, 4), (4, 6, 8), {"left-to-right": (0.5, 6)})
    ratio_rows("Monarch 256, 16 blocks", monarch(256, 256, 16), (4, 6, 8), {"optimal": (0.75, 0)})
    ratio_rows("Monarch 1024, 32 blocks", monarch(1024, 1024, 32), (4, 6, 8), {"optimal": (0.75, 0)})


def growth_rows() -> None:
    """Error growth with depth at fixed t: L=6 (N=64) -> L=10 (N=1024)."""
    for t in (4, 8):
        fmt = f"float:t{t}"
        for method in ("left-to-right", "feedback", "none"):
            errs = [
                product_error(square_butterfly(n), gaussian(square_butterfly(n)), fmt, method)
                for n in (64, 1024)
            ]
            growth = errs[1] / errs[0]
            label = "RTN" if method == "none" else method
            row("growth L=6 -> L=10", fmt, f"{label} err(L=6)", errs[0], "", None)
            row("growth L=6 -> L=10", fmt, f"{label} err(L=10)", errs[1], "", None)
            if method == "none":
                row("growth L=6 -> L=10", fmt, "RTN err(L=10)/err(L=6) (reference)", growth, "", None)
            else:
                row("growth L=6 -> L=10", fmt, f"{label} err(L=10)/err(L=6)", growth, "<= 1.2", growth <= 1.2)


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
