"""GPU benchmark of the KS kernels against cuBLAS dense, torch.bmm and the einsum reference.

Run: ``python benchmarks/ks_matmul_gpu.py`` on a machine with a CUDA GPU and CuPy
(``pip install lyoncompress[cuda]``). Without them it says so and exits 0.

Per case it prints, for the default GPU path (``ks_chain_apply``: each factor through
the kernel or einsum, whichever it measured faster), the fused two-factor kernel where it
applies, and each factor through the kernel alone: time, achieved bandwidth against the
minimum traffic ``elem_size * (B*a*c*d + B*a*b*d + a*b*c*d)`` and as a % of 3.0 TB/s,
speed-ups over ``torch.bmm``, over torch's einsum (the CPU path, one cuBLAS batched
GEMM on a GPU) and over cuBLAS dense, and the relative error against the float32
einsum on the same inputs (a fast wrong kernel is no result). A block-size sweep then
shows where the kernels stop beating einsum (why ``kernels.chain_route`` measures
rather than follows a rule), and a last section times the dequantize-fused int8/fp8
forward. A case that fails prints its error and the table goes on; the exit code is
then 1.
Goals: each factor >= 80% of HBM bandwidth and >= 1.4x bmm; bf16 Monarch 4096 at
B=16384 >= 3x dense.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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


HEADER = f"{'case':<44} {'ms':>8} {'GB/s':>6} {'HBM':>6} {'vs bmm':>7} {'vs einsum':>9} {'vs dense':>8}" + (
    f" {'rel err':>8}"
)


@dataclass(frozen=True)
class Baselines:
    bmm_ms: float
    einsum_ms: float
    dense_ms: float


def _row(label: str, ms: float, nbytes: int, base: Baselines, error: float) -> str:
    gbs = nbytes / (ms * 1e-3) / 1e9
    pct = 100 * gbs * 1e9 / HBM_BYTES_PER_S
    ratios = f"{base.bmm_ms / ms:6.2f}x {base.einsum_ms / ms:8.2f}x {base.dense_ms / ms:7.2f}x"
    return f"{label:<44} {ms:8.3f} {gbs:6.0f} {pct:5.1f}% {ratios} {error:8.1e}"


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def main() -> int:
    if not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None:
        print(
            "ks_matmul_gpu: needs a CUDA GPU and CuPy (pip install lyoncompress[cuda]); nothing to measure."
        )
        return 0
    print(f"device: {torch.cuda.get_device_name()}  (bandwidth % against {HBM_BYTES_PER_S / 1e12:.1f} TB/s)")
    print("goals: factor >= 80% HBM and >= 1.4x bmm; bf16 Monarch 4096 at B=16384 >= 3x dense")
    print(HEADER)
    failures = 0
    for name, chain, batches in CASES:
        for dtype in DTYPES:
            for batch in batches:
                try:
                    _bench_case(name, chain, dtype, batch)
                except Exception as error:  # noqa: BLE001 - report the case and go on with the table
                    failures += 1
                    print(f"-- {name} {str(dtype)[6:]} B={batch}: FAILED {type(error).__name__}: {error}")
    try:
        _sweep_block_sizes()
    except Exception as error:  # noqa: BLE001
        failures += 1
        print(f"-- block-size sweep: FAILED {type(error).__name__}: {error}")
    try:
        _bench_dequantize_fused(monarch(4096, 4096, 64).patterns[1], 16384)
    except Exception as error:  # noqa: BLE001
        failures += 1
        print(f"-- dequantize-fused: FAILED {type(error).__name__}: {error}")
    return 1 if failures else 0


def _bench_dequantize_fused(pattern: KSPattern, batch: int) -> None:
    """Low-bit payload fed to the kernel against dequantizing to bf16 first, then the kernel."""
    print(
        f"-- dequantize-fused forward {pattern} bf16 B={batch} (baseline: dequantize, then the bf16 kernel)"
    )
    x = torch.randn(batch, pattern.shape[1], device="cuda").to(torch.bfloat16)
    scales = torch.rand(*pattern.twiddle_shape[:3], 1, device="cuda") + 0.5
    payloads = {
        "int8": torch.randint(-127, 128, pattern.twiddle_shape, device="cuda", dtype=torch.int8),
        "fp8-e4m3": torch.randn(pattern.twiddle_shape, device="cuda").to(torch.float8_e4m3fn),
    }
    for name, payload in payloads.items():

        def dequantize_then_kernel(payload: torch.Tensor = payload) -> torch.Tensor:
            twiddle = (payload.float() * scales).to(torch.bfloat16)
            return kernels.factor_forward(pattern, twiddle, x)

        with torch.no_grad():
            fused_ms = _time_ms(partial(kernels.factor_forward_quantized, pattern, payload, scales, x))
            baseline_ms = _time_ms(dequantize_then_kernel)
            out = kernels.factor_forward_quantized(pattern, payload, scales, x)
            error = _rel_error(out, pattern.apply(payload.float() * scales, x.float()))
        print(
            f"   {name:<9} fused {fused_ms:.3f} ms, dequantize + kernel {baseline_ms:.3f} ms "
            f"({baseline_ms / fused_ms:.2f}x), rel err {error:.1e}"
        )


def _bench_case(name: str, chain: Chain, dtype: torch.dtype, batch: int) -> None:
    elem = torch.tensor([], dtype=dtype).element_size()
    twiddles = [torch.randn(s, device="cuda").to(dtype) for s in chain.twiddle_shapes]
    dense_w = chain.to_dense([t.float() for t in twiddles]).to(dtype)  # (m, n)
    x = torch.randn(batch, chain.shape[1], device="cuda").to(dtype)
    with torch.no_grad():
        base = Baselines(
            bmm_ms=_time_ms(partial(_chain_bmm, chain, twiddles, x)),
            einsum_ms=_time_ms(partial(chain.apply, twiddles, x)),
            dense_ms=_time_ms(partial(F.linear, x, dense_w)),
        )
        print(
            f"-- {name} {str(dtype)[6:]} B={batch}: dense {base.dense_ms:.3f} ms, "
            f"bmm {base.bmm_ms:.3f} ms, einsum {base.einsum_ms:.3f} ms"
        )
        nbytes = sum(_min_bytes(p, batch, elem) for p in chain.patterns)
        reference = chain.apply([t.float() for t in twiddles], x.float())
        run = partial(kernels.ks_chain_apply, chain.patterns, twiddles, x)
        tune_start = time.perf_counter()
        run()  # the first call measures the route
        torch.cuda.synchronize()
        tune_ms = 1e3 * (time.perf_counter() - tune_start)
        route = "".join("K" if k else "e" for k in kernels.chain_route(chain.patterns, twiddles, x))
        print(f"   route (K kernel, e einsum, first factor first): {route}, measured in {tune_ms:.0f} ms")
        error = _rel_error(run(), reference)
        print(_row("   default path (ks_chain_apply)", _time_ms(run), nbytes, base, error))
        if len(chain) == 2:
            fused = partial(kernels.chain_forward_fused, *chain.patterns, twiddles, x)
            if fused() is not None:
                error = _rel_error(fused(), reference)
                print(_row("   fused two-factor kernel", _time_ms(fused), nbytes, base, error))
        h = x
        for i in reversed(range(len(chain))):
            pattern, twiddle = chain.patterns[i], twiddles[i]
            factor = Baselines(
                bmm_ms=_time_ms(partial(_bmm, pattern, twiddle, h)),
                einsum_ms=_time_ms(partial(pattern.apply, twiddle, h)),
                dense_ms=base.dense_ms,
            )
            out = kernels.factor_forward(pattern, twiddle, h)
            error = _rel_error(out, pattern.apply(twiddle.float(), h.float()))
            factor_ms = _time_ms(partial(kernels.factor_forward, pattern, twiddle, h))
            nbytes = _min_bytes(pattern, batch, elem)
            print(_row(f"   kernel, factor {i} {pattern}", factor_ms, nbytes, factor, error))
            h = out


def _sweep_block_sizes(n: int = 4096, batch: int = 16384) -> None:
    """One factor of an n x n chain per square block size, first (d > 1) and last (a > 1)
    position: einsum time over kernel time, why kernels.chain_route measures routes."""
    print(f"-- block-size sweep, n={n}, B={batch}: einsum ms / kernel ms (> 1: the kernel wins)")
    print(f"{'block':>6} {'b*c/(b+c)':>10} {'dtype':>9} {'first (1,b,b,n/b)':>18} {'last (n/b,b,b,1)':>17}")
    for block in (2, 4, 8, 16, 32, 64, 128, 256):
        for dtype in DTYPES:
            ratios = []
            for pattern in (KSPattern(1, block, block, n // block), KSPattern(n // block, block, block, 1)):
                twiddle = torch.randn(pattern.twiddle_shape, device="cuda").to(dtype)
                x = torch.randn(batch, n, device="cuda").to(dtype)
                with torch.no_grad():
                    einsum_ms = _time_ms(partial(pattern.apply, twiddle, x))
                    kernel_ms = _time_ms(partial(kernels.factor_forward, pattern, twiddle, x))
                ratios.append(einsum_ms / kernel_ms)
            intensity = block / 2
            print(
                f"{block:>6} {intensity:>10.1f} {str(dtype)[6:]:>9} {ratios[0]:>17.2f}x {ratios[1]:>16.2f}x"
            )


def _chain_bmm(chain: Chain, twiddles: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for pattern, twiddle in zip(reversed(chain.patterns), reversed(twiddles)):
        x = _bmm(pattern, twiddle, x)
    return x


if __name__ == "__main__":
    sys.exit(main())
