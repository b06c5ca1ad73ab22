"""CuPy raw CUDA kernels for Kronecker-sparse (KS) products; the only module that knows CUDA.

The sources live in ``kernels/*.cu`` (installed by the wheel under ``<prefix>/share/lyoncompress/kernels``).
Every specialisation (pattern, dtype, tile shape) is a set of ``-D`` constants, so the
files are plain ``extern "C"`` CUDA that also builds with ``nvcc`` alone. Compiled
functions are cached per (file, kernel, constants, device). CuPy is imported lazily:
this module imports on machines without it, and only a call that needs it raises
``ImportError`` with the install hint.

Conventions are those of ``butterfly.py``: a pattern ``(a, b, c, d)`` has a twiddle of
shape ``(a, d, b, c)`` and maps ``x (B, a*c*d) -> y (B, a*b*d)``. Patterns are taken
by duck typing (anything with ``as_tuple()``) so that this module imports nothing from
the package but the error types.

Backend choice (``use_cuda_kernels``): the environment variable ``LYONCOMPRESS_KERNELS``
is ``torch`` (always the reference einsum), ``cupy`` (every factor through the kernels; an
error if they cannot run) or unset (for CUDA tensors when CuPy imports, each chain's
fastest route among kernels and einsum, measured on first use; torch otherwise).
"""

from __future__ import annotations

import functools
import math
import os
import site
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lyoncompress.errors import InputError

ENV_VAR = "LYONCOMPRESS_KERNELS"
BACKENDS = ("torch", "cupy")
INSTALL_HINT = "pip install lyoncompress[cuda]"

_DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# TW_FORMAT of ks_common.cuh: payload dtype of a dequantize-fused twiddle
_TW_FORMATS = {torch.int8: 1, torch.float8_e4m3fn: 2}
_MAX_THREADS = 256
_SMEM_LIMIT = 48 * 1024  # static shared memory a block may use without opt-in
_TARGET_BLOCKS = 2048  # enough blocks to fill a large GPU several times over
# Tensor cores pay off once each b x c block does enough work per element it
# reads; b*c/(b+c) is that ratio (8 for 16 x 16 blocks).
MMA_MIN_INTENSITY = 8.0


class PatternLike(Protocol):
    def as_tuple(self) -> tuple[int, int, int, int]: ...

    def apply(self, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- plans
# A plan is everything a launch needs that does not depend on CuPy, so it can be
# checked on any machine.


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: source file, function, ``-D`` constants, grid and block size."""

    source: str
    kernel: str
    defines: tuple[tuple[str, int], ...]
    grid: tuple[int, int, int]
    threads: int
    smem_bytes: int
    ints: tuple[int, ...]  # the int32 arguments after the pointers

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(f"-D{name}={value}" for name, value in self.defines)


@dataclass(frozen=True)
class _Gemm:
    """``out[g,p,q] = Σ_r L[g,p,r] R[g,q,r]`` over groups ``g = (i, k)``, with strides."""

    sizes: tuple[int, int, int]  # (P, Q, R)
    left: tuple[int, int, int, int]  # strides of L along (i, k, p, r)
    right: tuple[int, int, int, int]  # strides of R along (i, k, q, r)
    out: tuple[int, int, int, int]  # strides of out along (i, k, p, q)


def _forward_gemm(a: int, b: int, c: int, d: int, batch: int) -> _Gemm:
    # y[B,i,j,k] = Σ_l x[B,i,l,k] T[i,k,j,l]
    return _Gemm((batch, b, c), (c * d, 1, a * c * d, d), (d * b * c, b * c, c, 1), (b * d, 1, a * b * d, d))


def _grad_input_gemm(a: int, b: int, c: int, d: int, batch: int) -> _Gemm:
    # dx[B,i,l,k] = Σ_j dy[B,i,j,k] T[i,k,j,l]
    return _Gemm((batch, c, b), (b * d, 1, a * b * d, d), (d * b * c, b * c, 1, c), (c * d, 1, a * c * d, d))


def _grad_twiddle_gemm(a: int, b: int, c: int, d: int, batch: int) -> _Gemm:
    # dT[i,k,j,l] = Σ_B dy[B,i,j,k] x[B,i,l,k]
    return _Gemm((b, c, batch), (b * d, 1, d, a * b * d), (c * d, 1, d, a * c * d), (d * b * c, b * c, c, 1))


PRODUCTS: dict[str, Callable[[int, int, int, int, int], _Gemm]] = {
    "forward": _forward_gemm,
    "grad_input": _grad_input_gemm,
    "grad_twiddle": _grad_twiddle_gemm,
}


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _simt_tiles(P: int, Q: int, R: int, d: int) -> dict[str, int]:
    # k groups side by side make loads along the stride-d axis coalesce; fewer output
    # columns per block then keep enough batch rows to reuse each twiddle tile
    bd = min(_pow2_floor(d), 8)
    bq = min(_pow2_ceil(Q), 64 if bd == 1 else 32)
    tq = min(4, bq)
    nt_q = bq // tq
    tp = min(4, _pow2_ceil(P))
    nt_p = max(1, min(_MAX_THREADS // (bd * nt_q), _pow2_ceil(math.ceil(P / tp))))
    bp = nt_p * tp
    br = min(16, _pow2_ceil(R))
    while br > 1 and 4 * br * bd * (bp + bq) > _SMEM_LIMIT:
        br //= 2
    return {"BP": bp, "BQ": bq, "BR": br, "BD": bd, "TP": tp, "TQ": tq}


def _mma_tiles(Q: int, d: int) -> dict[str, int]:
    wn = min(32, max(8, _pow2_ceil(Q)))
    bq = min(64, max(wn, _pow2_ceil(Q)))
    bp, br = 64, 32
    warps_pq = (bp // 32) * (bq // wn)
    bd = max(1, min(_pow2_floor(d), 8 // warps_pq))
    while bd > 1 and _mma_smem(bp, bq, br, bd) > _SMEM_LIMIT:
        bd //= 2
    return {"BP": bp, "BQ": bq, "BR": br, "BD": bd, "WN": wn}


def _mma_smem(bp: int, bq: int, br: int, bd: int) -> int:
    return max(2 * bd * (bp + bq) * (br + 8), 4 * bd * bp * bq)


def plan_gemm(
    product: str,
    pattern: tuple[int, int, int, int],
    batch: int,
    dtype: torch.dtype,
    tw_dtype: torch.dtype | None = None,
) -> LaunchPlan:
    """Launch plan of ``ks_gemm.cu`` for one product of one factor.

    Args:
        product: ``"forward"``, ``"grad_input"`` or ``"grad_twiddle"``.
        pattern: ``(a, b, c, d)``.
        batch: rows ``B`` of the activations.
        dtype: activation dtype (float32, float16 or bfloat16).
        tw_dtype: int8 or float8_e4m3fn for the dequantize-fused forward, else None.
    """
    if product not in PRODUCTS:
        raise InputError(f"unknown KS product {product!r}; known: {', '.join(PRODUCTS)}")
    if dtype not in _DTYPE_IDS:
        raise InputError(f"the KS kernels take float32, float16 or bfloat16 activations, got {dtype}")
    if tw_dtype is not None and (product != "forward" or tw_dtype not in _TW_FORMATS):
        raise InputError(
            f"dequantize-fused kernels exist for the forward of int8 / float8_e4m3fn, got {tw_dtype}"
        )
    a, b, c, d = pattern
    gemm = PRODUCTS[product](a, b, c, d, batch)
    P, Q, R = gemm.sizes
    atomic = product == "grad_twiddle"
    use_mma = dtype != torch.float32 and b * c / (b + c) >= MMA_MIN_INTENSITY
    if use_mma:
        tiles = _mma_tiles(Q, d)
        threads = 32 * tiles["BD"] * (tiles["BP"] // 32) * (tiles["BQ"] // tiles["WN"])
        smem = _mma_smem(tiles["BP"], tiles["BQ"], tiles["BR"], tiles["BD"])
    else:
        tiles = _simt_tiles(P, Q, R, d)
        threads = tiles["BD"] * (tiles["BQ"] // tiles["TQ"]) * (tiles["BP"] // tiles["TP"])
        smem = 4 * tiles["BR"] * tiles["BD"] * (tiles["BP"] + tiles["BQ"])
    # grad twiddle reduces over the batch: split it across blocks (atomic float32 adds)
    splits = min(64, math.ceil(R / 1024)) if atomic else 1
    r_chunk = math.ceil(math.ceil(R / splits) / tiles["BR"]) * tiles["BR"]
    blocks = math.ceil(P / tiles["BP"]) * math.ceil(Q / tiles["BQ"]) * math.ceil(d / tiles["BD"]) * a
    names = ("I", "K", "P", "R")
    defines = {
        "DTYPE_ID": _DTYPE_IDS[dtype],
        "TW_FORMAT": _TW_FORMATS.get(tw_dtype, 0),
        "ATOMIC_OUT": int(atomic),
        "N_I": a,
        "N_K": d,
        **{f"L_S{n}": s for n, s in zip(names, gemm.left)},
        **{f"R_S{n}": s for n, s in zip(("I", "K", "Q", "R"), gemm.right)},
        **{f"O_S{n}": s for n, s in zip(("I", "K", "P", "Q"), gemm.out)},
        # scales (a, d, b, 1) of the dequantize-fused forward, indexed by (i, k, q=j)
        "S_SI": d * b,
        "S_SK": b,
        "S_SQ": 1,
        **tiles,
    }
    return LaunchPlan(
        source="ks_gemm.cu",
        kernel="ks_gemm_mma" if use_mma else "ks_gemm_simt",
        defines=tuple(defines.items()),
        grid=(blocks, 1, splits),
        threads=threads,
        smem_bytes=smem,
        ints=(P, Q, R, r_chunk),
    )


def _monarch_smem(bm: int, kt: int, uc: int, c1: int, rr: int) -> int:
    return 4 * (bm * c1 * kt + bm * uc + rr * kt * (uc + 1))


def plan_monarch(
    left: tuple[int, int, int, int], right: tuple[int, int, int, int], batch: int, dtype: torch.dtype
) -> LaunchPlan | None:
    """Launch plan of the fused two-factor kernel ``ks_monarch.cu`` for ``X_1 X_2``, or
    None when the chain has another shape or its intermediate does not fit on chip."""
    if dtype not in _DTYPE_IDS:
        return None
    (a1, b1, c1, d1), (a2, b2, c2, d2) = left, right
    if a1 != 1 or d2 != 1 or c1 * d1 != a2 * b2 or b2 % d1:
        return None
    rr = b2 // d1
    kt, bm, uc = min(_pow2_floor(d1), 8), 16, min(c2, 64)
    while _monarch_smem(bm, kt, uc, c1, rr) > _SMEM_LIMIT and uc > 8:
        uc //= 2
    while _monarch_smem(bm, kt, uc, c1, rr) > _SMEM_LIMIT and kt > 1:
        kt //= 2
    while _monarch_smem(bm, kt, uc, c1, rr) > _SMEM_LIMIT and bm > 1:
        bm //= 2
    smem = _monarch_smem(bm, kt, uc, c1, rr)
    if smem > _SMEM_LIMIT:
        return None
    defines = {"DTYPE_ID": _DTYPE_IDS[dtype], "B1": b1, "C1": c1, "D1": d1, "A2": a2, "B2": b2, "C2": c2}
    defines |= {"BM": bm, "KT": kt, "UC": uc, "NTHREADS": _MAX_THREADS}
    return LaunchPlan(
        source="ks_monarch.cu",
        kernel="ks_monarch",
        defines=tuple(defines.items()),
        grid=(math.ceil(batch / bm) * math.ceil(d1 / kt), 1, 1),
        threads=_MAX_THREADS,
        smem_bytes=smem,
        ints=(batch,),
    )


# ----------------------------------------------------------------------------- CuPy


def source_dir() -> Path:
    """Folder holding the ``.cu`` sources.

    Searched in order: the checkout's top-level ``kernels/``, and
    ``<prefix>/share/lyoncompress/kernels`` where the wheel installs them (see pyproject's
    ``data-files``), for the environment and the user scheme.
    """
    here = Path(__file__).resolve().parent
    shared = Path("share") / "lyoncompress" / "kernels"
    candidates = [
        here.parent / "kernels",
        Path(sysconfig.get_path("data")) / shared,
        Path(sys.prefix) / shared,
        Path(site.getuserbase()) / shared,
    ]
    for candidate in candidates:
        if (candidate / "ks_gemm.cu").is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"CUDA sources not found in any of {searched}; reinstall lyoncompress")


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as error:
        raise ImportError(f"the CUDA kernels need CuPy: {INSTALL_HINT} ({error})") from error
    return cupy


@functools.cache
def _function(source: str, kernel: str, options: tuple[str, ...], device: int) -> Any:
    cupy = _cupy()
    folder = source_dir()
    # the #line directive makes compiler messages name the real file
    code = f'#line 1 "kernels/{source}"\n' + (folder / source).read_text()
    with cupy.cuda.Device(device):
        # CuPy targets the current device's compute capability; -arch is never set here
        module = cupy.RawModule(code=code, options=("-std=c++17", f"-I{folder}", *options))
        return module.get_function(kernel)


def _launch(plan: LaunchPlan, tensors: Sequence[torch.Tensor | None], device: torch.device) -> None:
    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(plan.source, plan.kernel, plan.options, index)
    pointers = [np.uint64(t.data_ptr() if t is not None else 0) for t in tensors]
    args = (*pointers, *(np.int32(n) for n in plan.ints))
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream, index):
        function(plan.grid, (plan.threads,), args)


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tuple(tensor.shape) != shape:
        raise InputError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise InputError(f"{name} must be contiguous (call .contiguous())")
    if tensor.device != device:
        raise InputError(f"{name} is on {tensor.device} but the input is on {device}")


def _int32_ok(*numels: int) -> None:
    # the kernels index the batch dimension in 64-bit but take sizes as int32
    if max(numels) >= 2**31:
        raise InputError("a KS kernel dimension exceeds 2^31 - 1; split the batch")


def factor_forward(pattern: PatternLike, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x (B, a*c*d) -> y (B, a*b*d)`` with the kernel (no autograd)."""
    a, b, c, d = pattern.as_tuple()
    batch = x.shape[0]
    _check("x", x, (batch, a * c * d), x.device)
    _check("twiddle", twiddle, (a, d, b, c), x.device)
    if twiddle.dtype != x.dtype:
        raise InputError(f"twiddle dtype {twiddle.dtype} differs from the input dtype {x.dtype}")
    _int32_ok(batch)
    y = torch.empty(batch, a * b * d, dtype=x.dtype, device=x.device)
    if batch:
        _launch(plan_gemm("forward", (a, b, c, d), batch, x.dtype), (x, twiddle, None, y), x.device)
    return y


def factor_forward_quantized(
    pattern: PatternLike, payload: torch.Tensor, scales: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Dequantize-fused forward: twiddle ``= scales * payload`` with ``payload`` int8 or
    float8_e4m3fn of shape ``(a, d, b, c)`` and float32 ``scales`` of shape ``(a, d, b, 1)``."""
    a, b, c, d = pattern.as_tuple()
    batch = x.shape[0]
    _check("x", x, (batch, a * c * d), x.device)
    _check("payload", payload, (a, d, b, c), x.device)
    _check("scales", scales, (a, d, b, 1), x.device)
    if scales.dtype != torch.float32:
        raise InputError(f"scales must be float32, got {scales.dtype}")
    _int32_ok(batch)
    y = torch.empty(batch, a * b * d, dtype=x.dtype, device=x.device)
    if batch:
        plan = plan_gemm("forward", (a, b, c, d), batch, x.dtype, tw_dtype=payload.dtype)
        _launch(plan, (x, payload, scales, y), x.device)
    return y


def factor_grad_input(pattern: PatternLike, twiddle: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``dx (B, a*c*d)`` from ``dy (B, a*b*d)``: the product with the transposed factor."""
    a, b, c, d = pattern.as_tuple()
    batch = grad_y.shape[0]
    _check("grad_y", grad_y, (batch, a * b * d), grad_y.device)
    grad_x = torch.empty(batch, a * c * d, dtype=grad_y.dtype, device=grad_y.device)
    if batch:
        plan = plan_gemm("grad_input", (a, b, c, d), batch, grad_y.dtype)
        _launch(plan, (grad_y, twiddle, None, grad_x), grad_y.device)
    return grad_x


def factor_grad_twiddle(pattern: PatternLike, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``dT (a, d, b, c) = Σ_B dy[B,a,b,d] x[B,a,c,d]``, accumulated in float32."""
    a, b, c, d = pattern.as_tuple()
    batch = x.shape[0]
    _check("grad_y", grad_y, (batch, a * b * d), x.device)
    grad_t = torch.zeros(a, d, b, c, dtype=torch.float32, device=x.device)  # atomically accumulated
    if batch:
        _launch(plan_gemm("grad_twiddle", (a, b, c, d), batch, x.dtype), (grad_y, x, None, grad_t), x.device)
    return grad_t.to(x.dtype)


def chain_forward_fused(
    left: PatternLike, right: PatternLike, twiddles: Sequence[torch.Tensor], x: torch.Tensor
) -> torch.Tensor | None:
    """``x @ (X_1 X_2)^T`` in one kernel with the intermediate on chip, or None when the
    fused kernel does not cover this chain (then apply the factors one by one).

    Experimental and not dispatched: on an H200 it was 2-40x slower than the two
    factors one by one (benchmarks/ks_matmul_gpu.py, RESULTS.md)."""
    plan = plan_monarch(left.as_tuple(), right.as_tuple(), x.shape[0], x.dtype)
    if plan is None:
        return None
    (_, b1, c1, d1), (a2, b2, c2, _) = left.as_tuple(), right.as_tuple()
    _check("x", x, (x.shape[0], a2 * c2), x.device)
    _check("twiddle 0", twiddles[0], (1, d1, b1, c1), x.device)
    _check("twiddle 1", twiddles[1], (a2, 1, b2, c2), x.device)
    _int32_ok(x.shape[0])
    y = torch.empty(x.shape[0], b1 * d1, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _launch(plan, (x, twiddles[1], twiddles[0], y), x.device)
    return y


# ----------------------------------------------------------------------------- autograd and dispatch


class _KSFactorFunction(torch.autograd.Function):
    """One KS factor through the kernels, with both gradients through the kernels too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, twiddle: torch.Tensor, pattern: PatternLike) -> torch.Tensor:
        ctx.save_for_backward(x, twiddle)
        ctx.pattern = pattern
        return factor_forward(pattern, twiddle, x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, twiddle = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = factor_grad_input(ctx.pattern, twiddle, grad_y) if ctx.needs_input_grad[0] else None
        grad_t = factor_grad_twiddle(ctx.pattern, x, grad_y) if ctx.needs_input_grad[1] else None
        return grad_x, grad_t, None


def ks_factor_apply(pattern: PatternLike, twiddle: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ X.T`` for one factor through the CUDA kernels, differentiable.

    Args:
        pattern: ``(a, b, c, d)`` as a ``KSPattern`` (anything with ``as_tuple()``).
        twiddle: ``(a, d, b, c)``, contiguous, same dtype and device as ``x``.
        x: ``(B, a*c*d)`` CUDA tensor, contiguous.

    Returns:
        ``y (B, a*b*d)``, allocated by torch and computed on torch's current stream.
    """
    return _KSFactorFunction.apply(x, twiddle, pattern)


# Which of kernel and einsum is faster depends on the block size, the factor's place,
# the dtype, the GPU and the layout the previous factor left: einsum on a
# block-diagonal (d = 1) factor returns a feature-major view that the next einsum reads
# without a copy, while a kernel needs it made contiguous first. On an H200 the kernel
# alone was 1.5-10x faster than einsum on 2 x 2 blocks and on first factors up to
# 64 x 64 blocks, 2-10x slower on block-diagonal factors from 4 x 4 blocks up, and a
# Monarch chain ran fastest as einsum only (benchmarks/ks_matmul_gpu.py, RESULTS.md).
# So each chain's route is measured on first use and cached.
Route = tuple[bool, ...]  # per factor, in chain order: through the kernel (True) or einsum
_routes: dict[tuple[object, ...], Route] = {}
_TUNE_REPEATS = 3


def _elapsed_ms(run: Callable[[], object]) -> float:
    run()  # compiles the kernel / warms cuBLAS
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_TUNE_REPEATS):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _apply_factor(pattern: PatternLike, twiddle: torch.Tensor, h: torch.Tensor, kernel: bool) -> torch.Tensor:
    return (
        ks_factor_apply(pattern, twiddle.contiguous(), h.contiguous())
        if kernel
        else pattern.apply(twiddle, h)
    )


def _run_route(
    patterns: Sequence[PatternLike], twiddles: Sequence[torch.Tensor], h: torch.Tensor, route: Route
) -> torch.Tensor:
    for pattern, twiddle, kernel in zip(reversed(patterns), reversed(twiddles), reversed(route)):
        h = _apply_factor(pattern, twiddle, h, kernel)
    return h


def chain_route(patterns: Sequence[PatternLike], twiddles: Sequence[torch.Tensor], h: torch.Tensor) -> Route:
    """The fastest of three routes for this chain on ``h (B, n)``: einsum only, kernels
    only, and per factor the faster of the two on the layout it receives.

    Timed the first time a (chain, dtype, batch rounded up to a power of two, device)
    is seen, then cached: later calls cost a dictionary lookup. The timing synchronises
    the device, so run a shape once before capturing it in a CUDA graph.
    """
    key = (tuple(p.as_tuple() for p in patterns), h.dtype, _pow2_ceil(h.shape[0]), h.device.index or 0)
    if key not in _routes:
        with torch.no_grad():
            twiddles = [t.detach() for t in twiddles]
            greedy: list[bool] = []
            g = h
            for pattern, twiddle in zip(reversed(patterns), reversed(twiddles)):
                kernel_ms = _elapsed_ms(functools.partial(_apply_factor, pattern, twiddle, g, True))
                einsum_ms = _elapsed_ms(functools.partial(_apply_factor, pattern, twiddle, g, False))
                greedy.insert(0, kernel_ms < einsum_ms)
                g = _apply_factor(pattern, twiddle, g, greedy[0])
            candidates = {(False,) * len(patterns), (True,) * len(patterns), tuple(greedy)}
            timed = {
                r: _elapsed_ms(functools.partial(_run_route, patterns, twiddles, h, r)) for r in candidates
            }
        _routes[key] = min(timed, key=timed.__getitem__)
    return _routes[key]


def ks_chain_apply(
    patterns: Sequence[PatternLike], twiddles: Sequence[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``x @ (X_1 … X_L).T`` on the GPU: ``(…, n) -> (…, m)``, ``X_L`` applied first.

    With ``LYONCOMPRESS_KERNELS=cupy`` every factor goes through ``ks_factor_apply``;
    unset, each factor goes through the kernel or the pattern's einsum as the route
    measured fastest on first use says (``chain_route``). The fused two-factor kernel
    (``chain_forward_fused``) is not used here: on an H200 it was 2-40x slower than the
    factors one by one (RESULTS.md).

    Example:
        >>> y = ks_chain_apply(chain.patterns, layer.twiddles, x.cuda())
    """
    if len(patterns) != len(twiddles):
        raise InputError(f"{len(patterns)} patterns but {len(twiddles)} twiddles")
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])  # (B, n)
    route = (True,) * len(patterns) if backend() == "cupy" else chain_route(patterns, twiddles, h)
    h = _run_route(patterns, twiddles, h, route)
    return h.reshape(*lead, h.shape[-1])  # (…, m)


def _cupy_importable() -> bool:
    try:
        _cupy()
    except ImportError:
        return False
    return True


def kernels_available(x: torch.Tensor) -> bool:
    """Whether the CUDA kernels can run on ``x``: a CUDA tensor of a supported dtype, with CuPy installed."""
    return x.is_cuda and x.dtype in _DTYPE_IDS and _cupy_importable()


def backend() -> str | None:
    """The backend forced by ``LYONCOMPRESS_KERNELS`` (``torch`` or ``cupy``), None when unset."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise InputError(
            f"{ENV_VAR}={value!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it"
        )
    return value


def use_cuda_kernels(x: torch.Tensor) -> bool:
    """Whether KS products on ``x`` should go through ``ks_chain_apply`` (the kernels,
    or einsum per factor where the measured route says so) rather than plain einsum.

    Unset ``LYONCOMPRESS_KERNELS``: yes exactly when ``kernels_available(x)``.
    ``torch``: never. ``cupy``: always, and an error when they cannot run
    (``ImportError`` without CuPy, ``InputError`` for a CPU tensor or unsupported dtype).
    """
    forced = backend()
    if forced == "torch":
        return False
    if forced is None:
        return kernels_available(x)
    _cupy()
    if not x.is_cuda or x.dtype not in _DTYPE_IDS:
        raise InputError(
            f"{ENV_VAR}=cupy needs CUDA tensors of float32, float16 or bfloat16, got a {x.device.type} "
            f"{x.dtype} tensor; move the model and inputs to the GPU or set {ENV_VAR}=torch"
        )
    return True
