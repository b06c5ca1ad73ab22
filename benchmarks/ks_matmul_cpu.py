"""Benchmark: ``ButterflyLinear`` forward on CPU against a dense ``nn.Linear``.

Run: ``.venv/bin/python benchmarks/ks_matmul_cpu.py``.

For each size ``n`` (square layers, batch 256, float32, inference under
``torch.inference_mode``) three layers are timed in the same run:

* ``dense``: ``nn.Linear(n, n)`` with a random weight — what we want to beat;
* ``KS``: ``ButterflyLinear`` with the chain (the reference einsum product, one
  einsum per factor: the CPU path of the package);
* ``KS dense``: ``nn.Linear`` whose weight is the same chain materialised — same
  function as ``KS``, so ``KS / KS dense`` is the speed-up the factorization buys.

Chains: ``L=2`` is Monarch with ``2^⌊log2(n)/2⌋`` blocks (``√n`` when ``n`` is an even
power of two); ``L=log2 n`` is the square radix-2 butterfly. Timing: warm-up, then the
best of ``--repeats`` blocks of calls (each ≥ 10 ms), the three layers taking turns;
``torch.set_num_threads`` is left at its default.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from lyoncompress.butterfly import Chain, monarch, square_butterfly
from lyoncompress.layers import ButterflyLinear

BATCH = 256
SIZES = (1024, 2048, 4096)


def best_per_call(
    fns: dict[str, Callable[[], object]], repeats: int, min_block_s: float = 0.01
) -> dict[str, float]:
    """Best-of-``repeats`` seconds per call of each function, taking turns block by block.

    The machine may be shared: alternating exposes every function to the same load,
    and the minimum over short blocks is the estimate least disturbed by it."""
    calls: dict[str, int] = {}
    for label, fn in fns.items():
        for _ in range(3):  # warm-up: allocator, einsum path choice, thread pool
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
        calls[label] = max(1, math.ceil(min_block_s / once))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[label]):
                fn()
            best[label] = min(best[label], (time.perf_counter() - start) / calls[label])
    return best


def chains(n: int) -> list[tuple[str, Chain]]:
    blocks = 2 ** (int(math.log2(n)) // 2)
    return [
        (f"L=2 Monarch ({blocks} blocks)", monarch(n, n, blocks)),
        (f"L={int(math.log2(n))} radix-2 butterfly", square_butterfly(n)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# ButterflyLinear forward vs dense, CPU, batch {BATCH}, float32, best of {args.repeats}")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, python "
        f"{platform.python_version()}; load average before: {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (shared machine)"
    )
    print()
    header = "| n | chain | params KS / dense | dense ms | KS ms | KS dense ms | KS / dense | KS / KS dense |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with torch.inference_mode():
        for n in args.sizes:
            x = torch.randn(BATCH, n)
            dense = nn.Linear(n, n)
            for label, chain in chains(n):
                twiddles = [torch.randn(shape) / math.sqrt(shape[-1]) for shape in chain.twiddle_shapes]
                ks = ButterflyLinear.from_twiddles(chain, twiddles, bias=dense.bias.detach().clone())
                materialised = nn.Linear(n, n)
                materialised.weight.copy_(ks.to_dense())
                materialised.bias.copy_(dense.bias)
                # the two must be the same function, or the comparison means nothing
                torch.testing.assert_close(ks(x), materialised(x), rtol=1e-3, atol=1e-3)
                t = best_per_call(
                    {"dense": partial(dense, x), "ks": partial(ks, x), "mat": partial(materialised, x)},
                    args.repeats,
                )
                t_dense, t_ks, t_mat = t["dense"], t["ks"], t["mat"]
                print(
                    f"| {n} | {label} | {chain.params / (n * n):.4f} | {t_dense * 1e3:.3f} | "
                    f"{t_ks * 1e3:.3f} | {t_mat * 1e3:.3f} | {t_ks / t_dense:.2f} | {t_ks / t_mat:.2f} |",
                    flush=True,
                )
    print()
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
