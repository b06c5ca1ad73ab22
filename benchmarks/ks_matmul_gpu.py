"""GPU benchmark of the KS kernels against cuBLAS dense, torch.bmm and the einsum reference.

Run: ``python benchmarks/ks_matmul_gpu.py`` on a machine with a CUDA GPU and CuPy
(``pip install lyoncompress[cuda]``). Without them it says so and exits 0.

Per factor it prints the time, the achieved bandwidth against the minimum traffic
``elem_size * (B*a*c*d + B*a*b*d + a*b*c*d)``, that bandwidth as a % of 3.0 TB/s, and
the speed-up over bmm and over dense. Goals: each factor >= 80% of HBM bandwidth and
>= 1.4x bmm; the fused bf16 Monarch at B=16384 >= 3x dense.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from lyoncompress import kernels
from lyoncompress.butterfly import Chain, KSPattern, monarch, square_butterfly

HBM_BYTES_PER_S = 3.0e12
CASES: list[tuple[str, Chain, list[int]]] = [
    ("Monarch 4096, 64 blocks", monarch(4096, 4096, 64), [4096, 16384]),
    ("square radix-2 butterfly 4096", square_butterfly(4096), [4096]),
    ("MiniLM 384 -> 1536 (Monarch 8)", monarch(1536, 384, 8), [16384]),
    ("ViT 768 -> 3072 (Monarch 16)", monarch(3072, 768, 16), [16384]),
    ("rectangular (1,768,192,2)(2,192,768,1)", Chain.of((1, 768, 192, 2), (2, 192, 768, 1)), [16384]),
]
DTYPES = [torch.float32, torch.bfloat16]


def _time_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _bmm(pattern: KSPattern, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = pattern.as_tuple()
    xs = x.view(-1, a, c, d).permute(1, 3, 0, 2).reshape(a * d, -1, c)  # (a*d, B, c)
    ys = torch.bmm(xs, twiddle.view(a * d, b, c).transpose(1, 2))  # (a*d, B, b)
    return ys.view(a, d, -1, b).permute(2, 0, 3, 1).reshape(-1, a * b * d)  # (B, a*b*d)


def _min_bytes(pattern: KSPattern, batch: int, elem: int) -> int:
    a, b, c, d = pattern.as_tuple()
    return elem * (batch * a * c * d + batch * a * b * d + a * b * c * d)


def _row(label: str, ms: float, nbytes: int, bmm_ms: float, dense_ms: float) -> str:
    gbs = nbytes / (ms * 1e-3) / 1e9
    pct = 100 * gbs * 1e9 / HBM_BYTES_PER_S
    return f"{label:<44} {ms:9.3f} {gbs:9.0f} {pct:6.1f}% {bmm_ms / ms:7.2f}x {dense_ms / ms:7.2f}x"


def main() -> int:
    if not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None:
        print(
            "ks_matmul_gpu: needs a CUDA GPU and CuPy (pip install lyoncompress[cuda]); nothing to measure."
        )
        return 0
    print(f"device: {torch.cuda.get_device_name()}  (bandwidth % against {HBM_BYTES_PER_S / 1e12:.1f} TB/s)")
    print("goals: factor >= 80% HBM and >= 1.4x bmm; fused bf16 Monarch 4096 at B=16384 >= 3x dense")
    print(f"{'case':<44} {'ms':>9} {'GB/s':>9} {'HBM':>7} {'vs bmm':>8} {'vs dense':>8}")
    for name, chain, batches in CASES:
        for dtype in DTYPES:
            for batch in batches:
                _bench_case(name, chain, dtype, batch)
    return 0


def _bench_case(name: str, chain: Chain, dtype: torch.dtype, batch: int) -> None:
    elem = torch.tensor([], dtype=dtype).element_size()
    twiddles = [torch.randn(s, device="cuda").to(dtype) for s in chain.twiddle_shapes]
    dense_w = chain.to_dense([t.float() for t in twiddles]).to(dtype)  # (m, n)
    x = torch.randn(batch, chain.shape[1], device="cuda").to(dtype)
    with torch.no_grad():
        dense_ms = _time_ms(partial(F.linear, x, dense_w))
        bmm_chain_ms = _time_ms(partial(_chain_bmm, chain, twiddles, x))
        einsum_ms = _time_ms(partial(chain.apply, twiddles, x))
        chain_ms = _time_ms(partial(kernels.ks_chain_apply, chain.patterns, twiddles, x))
        print(
            f"-- {name} {str(dtype)[6:]} B={batch}: dense {dense_ms:.3f} ms, "
            f"bmm chain {bmm_chain_ms:.3f} ms, einsum {einsum_ms:.3f} ms"
        )
        nbytes = sum(_min_bytes(p, batch, elem) for p in chain.patterns)
        fused = len(chain) == 2 and kernels.plan_monarch(
            *(p.as_tuple() for p in chain.patterns), batch, dtype
        )
        label = "   kernels, whole chain" + (" (fused)" if fused else "")
        print(_row(label, chain_ms, nbytes, bmm_chain_ms, dense_ms))
        h = x
        for i in reversed(range(len(chain))):
            pattern, twiddle = chain.patterns[i], twiddles[i]
            factor_ms = _time_ms(partial(kernels.factor_forward, pattern, twiddle, h))
            bmm_ms = _time_ms(partial(_bmm, pattern, twiddle, h))
            print(
                _row(
                    f"   factor {i} {pattern}", factor_ms, _min_bytes(pattern, batch, elem), bmm_ms, dense_ms
                )
            )
            h = kernels.factor_forward(pattern, twiddle, h)


def _chain_bmm(chain: Chain, twiddles: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for pattern, twiddle in zip(reversed(chain.patterns), reversed(twiddles)):
        x = _bmm(pattern, twiddle, x)
    return x


if __name__ == "__main__":
    sys.exit(main())
