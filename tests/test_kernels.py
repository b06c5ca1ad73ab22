"""CUDA kernels for KS products: sources compile everywhere, launch plans are sane, the
backend choice is explicit, and on a GPU every kernel matches the einsum reference."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lyoncompress import kernels
from lyoncompress.butterfly import Chain, KSPattern, monarch, square_butterfly
from lyoncompress.errors import InputError
from lyoncompress.layers import ButterflyLinear

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
CU_FILES = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))

PATTERNS = [
    (1, 2, 2, 8),  # square radix-2, first factor
    (4, 2, 2, 2),
    (8, 2, 2, 1),  # square radix-2, last factor
    (1, 4, 4, 16),  # square radix-4
    (16, 4, 4, 1),
    (1, 64, 64, 64),  # Monarch 4096, 64 blocks
    (64, 64, 64, 1),
    (1, 768, 192, 2),  # rectangular, d > 1
    (2, 24, 40, 3),  # odd sizes everywhere
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative Frobenius error vs a float32 reference on the same rounded inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------- every machine


def _nvcc_variants() -> list[tuple[str, tuple[str, ...]]]:
    plans = [
        kernels.plan_gemm("forward", (1, 768, 192, 2), 4097, torch.bfloat16),
        kernels.plan_gemm("forward", (1, 64, 64, 64), 7, torch.float32),
        kernels.plan_gemm("grad_twiddle", (64, 64, 64, 1), 4097, torch.float16),
        kernels.plan_gemm("forward", (8, 32, 32, 2), 7, torch.bfloat16, tw_dtype=torch.float8_e4m3fn),
        kernels.plan_monarch((1, 384, 192, 1), (1, 192, 768, 1), 7, torch.float16),
    ]
    defaults = [(name, ("-DDTYPE_ID=2",)) for name in CU_FILES]  # the mma kernel needs 16-bit types
    return [*((name, ()) for name in CU_FILES), *defaults, *((p.source, p.options) for p in plans)]


@pytest.mark.parametrize(("source", "options"), _nvcc_variants())
def test_cu_compiles_with_nvcc_for_sm90(source: str, options: tuple[str, ...], tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    command = [nvcc, "-arch=sm_90", "-std=c++17", "-c", *options, str(KERNEL_DIR / source)]
    result = subprocess.run([*command, "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("product", list(kernels.PRODUCTS))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_plan_fits_a_block(product: str, pattern: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    plan = kernels.plan_gemm(product, pattern, 4097, dtype)
    tiles = dict(plan.defines)
    assert 1 <= plan.threads <= 1024 and plan.smem_bytes <= 48 * 1024
    if plan.kernel == "ks_gemm_mma":
        assert dtype != torch.float32 and plan.threads % 32 == 0 and tiles["BR"] % 16 == 0
    else:
        assert tiles["BP"] % tiles["TP"] == 0 and tiles["BQ"] % tiles["TQ"] == 0
    P, Q, R, r_chunk = plan.ints
    assert plan.grid[2] * r_chunk >= R  # the r splits cover the whole reduction


def test_monarch_plan_covers_monarch_and_lowrank_only() -> None:
    square = monarch(4096, 4096, 64).patterns
    assert kernels.plan_monarch(square[0].as_tuple(), square[1].as_tuple(), 16384, torch.bfloat16)
    assert kernels.plan_monarch((1, 384, 192, 1), (1, 192, 768, 1), 3, torch.float32)
    assert kernels.plan_monarch((2, 2, 2, 1), (1, 4, 4, 1), 3, torch.float32) is None


def test_sources_found_in_checkout() -> None:
    assert (kernels.source_dir() / "ks_gemm.cu").is_file()


def test_wheel_ships_the_cuda_sources(tmp_path: Path) -> None:
    build = tmp_path / "src"
    shutil.copytree(
        ROOT, build, ignore=shutil.ignore_patterns(".venv", ".git", "dist", "build", "*.egg-info")
    )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
    result = subprocess.run([*command, str(tmp_path / "dist"), str(build)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/share/lyoncompress/kernels/" in n}
    assert names == {p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh")}


def test_dispatcher_picks_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert not kernels.use_cuda_kernels(torch.zeros(2, 4))
    assert not kernels.kernels_available(torch.zeros(2, 4))
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert not kernels.use_cuda_kernels(torch.zeros(2, 4))


def test_forced_cupy_without_gpu_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "cupy")
    with pytest.raises((ImportError, InputError)) as caught:
        kernels.use_cuda_kernels(torch.zeros(2, 4))
    hint = kernels.INSTALL_HINT if caught.type is ImportError else f"{kernels.ENV_VAR}=torch"
    assert hint in str(caught.value)


def test_forced_cupy_layer_forward_fails_clearly_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "cupy")
    layer = ButterflyLinear(8, 8, square_butterfly(8))
    with pytest.raises((ImportError, InputError), match=r"lyoncompress\[cuda\]|LYONCOMPRESS_KERNELS"):
        layer(torch.zeros(3, 8))


def test_unknown_backend_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(InputError, match="torch, cupy"):
        kernels.use_cuda_kernels(torch.zeros(2, 4))


# ----------------------------------------------------------------------------- GPU

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
    reason="needs a CUDA GPU and CuPy",
)


def gpu(test):  # noqa: ANN001, ANN201 - a decorator: the gpu marker plus the skip condition
    return pytest.mark.gpu(requires_gpu(test))


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def _inputs(pattern: KSPattern, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    twiddle = torch.randn(pattern.twiddle_shape, device="cuda", generator=generator).to(dtype)
    x = torch.randn(batch, pattern.shape[1], device="cuda", generator=generator).to(dtype)
    return twiddle, x


@gpu
@pytest.mark.parametrize("batch", [1, 7, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_vs_einsum(pattern: tuple[int, int, int, int], dtype: torch.dtype, batch: int) -> None:
    ks = KSPattern(*pattern)
    twiddle, x = _inputs(ks, batch, dtype)
    expected = ks.apply(twiddle.float(), x.float())
    assert _rel_error(kernels.factor_forward(ks, twiddle, x), expected) < TOLERANCE[dtype]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_backward_vs_autograd(pattern: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    ks = KSPattern(*pattern)
    twiddle, x = _inputs(ks, 33, dtype)
    grad_y = torch.randn(33, ks.shape[0], device="cuda").to(dtype)
    # detach().float().clone(): for float32, .float() is the same tensor, and marking it
    # would make the kernel side's clones non-leaf tensors without .grad
    t_ref = twiddle.detach().float().clone().requires_grad_()
    x_ref = x.detach().float().clone().requires_grad_()
    ks.apply(t_ref, x_ref).backward(grad_y.float())
    t_k, x_k = twiddle.clone().requires_grad_(), x.clone().requires_grad_()
    kernels.ks_factor_apply(ks, t_k, x_k).backward(grad_y)
    # grad twiddle sums over the batch: allow the float32 atomics a looser bound
    assert _rel_error(x_k.grad, x_ref.grad) < TOLERANCE[dtype]
    assert _rel_error(t_k.grad, t_ref.grad) < 2 * TOLERANCE[dtype] + 1e-5


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "chain",
    [monarch(4096, 4096, 64), monarch(384, 768, 8, rank=2), Chain.of((1, 384, 64, 1), (1, 64, 768, 1))],
)
def test_fused_two_factor_vs_chain(chain: Chain, dtype: torch.dtype) -> None:
    twiddles = [torch.randn(s, device="cuda").to(dtype) for s in chain.twiddle_shapes]
    x = torch.randn(4097, chain.shape[1], device="cuda").to(dtype)
    fused = kernels.chain_forward_fused(chain.patterns[0], chain.patterns[1], twiddles, x)
    assert fused is not None
    expected = chain.apply([t.float() for t in twiddles], x.float())
    assert _rel_error(fused, expected) < 2 * TOLERANCE[dtype]


@gpu
@pytest.mark.parametrize("payload_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", [(1, 64, 64, 64), (1, 768, 192, 2), (4, 2, 2, 2)])
def test_dequantize_fused_vs_dequantized_einsum(
    pattern: tuple[int, int, int, int], dtype: torch.dtype, payload_dtype: torch.dtype
) -> None:
    ks = KSPattern(*pattern)
    twiddle, x = _inputs(ks, 7, dtype)
    if payload_dtype == torch.int8:
        payload = torch.randint(-127, 128, ks.twiddle_shape, device="cuda", dtype=torch.int8)
    else:
        payload = twiddle.float().to(torch.float8_e4m3fn)
    scales = torch.rand(*ks.twiddle_shape[:3], 1, device="cuda") + 0.5  # (a, d, b, 1)
    expected = ks.apply(payload.float() * scales, x.float())
    actual = kernels.factor_forward_quantized(ks, payload, scales, x)
    assert _rel_error(actual, expected) < TOLERANCE[dtype]


@gpu
def test_kernels_run_on_torch_current_stream() -> None:
    ks = KSPattern(1, 768, 192, 2)
    twiddle, x = _inputs(ks, 4097, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = kernels.factor_forward(ks, twiddle, x)
        z = y * 2  # ordered after the kernel only if it ran on this stream
    torch.cuda.current_stream().wait_stream(stream)
    assert _rel_error(z, 2 * ks.apply(twiddle.float(), x.float())) < TOLERANCE[torch.bfloat16]


@gpu
def test_each_chain_takes_the_measured_faster_route(monkeypatch: pytest.MonkeyPatch) -> None:
    # margins measured on an H200 (RESULTS.md): kernels only ~5x faster than einsum on a
    # radix-2 butterfly, einsum only ~3x faster than any route with kernels on a Monarch
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_routes", {})
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    for chain, expected in [(square_butterfly(4096), True), (monarch(4096, 4096, 64), False)]:
        twiddles = [torch.randn(s, device="cuda").bfloat16() for s in chain.twiddle_shapes]
        assert kernels.chain_route(chain.patterns, twiddles, x) == (expected,) * len(chain)
    assert len(kernels._routes) == 2  # measured once per chain, then looked up


@gpu
@pytest.mark.parametrize("forced", [None, "cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_apply_vs_einsum_with_gradients(
    dtype: torch.dtype, forced: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if forced is None:
        monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV_VAR, forced)
    chain = Chain.of((2, 64, 64, 1), (64, 2, 2, 1))  # a large-block and a 2 x 2-block factor
    twiddles = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in chain.twiddle_shapes]
    x = torch.randn(3, 5, chain.shape[1], device="cuda").to(dtype).requires_grad_()
    y = kernels.ks_chain_apply(chain.patterns, twiddles, x)
    expected = chain.apply([t.detach().float() for t in twiddles], x.detach().float())
    assert y.shape == (3, 5, chain.shape[0])
    assert _rel_error(y, expected) < 2 * TOLERANCE[dtype]
    y.float().square().sum().backward()
    assert all(t.grad is not None for t in twiddles) and x.grad is not None


@gpu
def test_butterfly_linear_trains_through_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    chain = square_butterfly(256)  # radix-2: every factor goes through the kernels
    reference = ButterflyLinear(256, 256, chain).cuda()
    for factor in reference.factors:
        torch.nn.init.normal_(factor.twiddle, std=0.1)
    layer = ButterflyLinear.from_twiddles(chain, [t.detach() for t in reference.twiddles]).cuda()
    x = torch.randn(64, 256, device="cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    reference(x).square().sum().backward()
    monkeypatch.setenv(kernels.ENV_VAR, "cupy")
    layer(x).square().sum().backward()
    for mine, theirs in zip(layer.twiddles, reference.twiddles):
        assert _rel_error(mine.grad, theirs.grad) < 1e-4
