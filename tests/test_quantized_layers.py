"""Quantized layers that stay quantized: forward vs dequantize-then-float, memory, loading."""

import pytest
import torch
from torch import nn

import lyoncompress.layers as layers_module
from lyoncompress.artifact import load_artifact
from lyoncompress.butterfly import lowrank, monarch, square_butterfly
from lyoncompress.layers import ButterflyLinear, QuantizedButterflyLinear
from lyoncompress.models import load_compressed
from lyoncompress.quantization.formats import get_format, pack_int4
from lyoncompress.quantization.payloads import (
    codes_and_row_scale,
    dequantize_payload,
    int4_pairs,
    int4_rows,
)
from tests.helpers import make_mlp_checkpoint

FORMATS = [("int8", None), ("int8", 2), ("int4", None), ("int4", 2), ("fp8-e4m3", None), ("bf16", None)]
CHAINS = [monarch(12, 8, 4, rank=2), lowrank(10, 6, 3), square_butterfly(8)]


def _quantized(chain, fmt_name, group_size, rank, generator):
    """A quantized layer and the float layer of its dequantized twiddles."""
    fmt = get_format(fmt_name)
    m, n = chain.shape
    hybrid = lowrank(m, n, rank) if rank else None
    shapes = chain.twiddle_shapes + (hybrid.twiddle_shapes if hybrid else [])
    payloads = [
        fmt.quantize(torch.randn(s, dtype=torch.float64, generator=generator), group_size) for s in shapes
    ]
    bias = torch.randn(m, generator=generator)
    layer = QuantizedButterflyLinear(n, m, chain, fmt_name, group_size, lowrank_rank=rank)
    state = {"bias": bias}
    for index, payload in enumerate(payloads):
        group, local = ("factors", index) if index < len(chain) else ("lowrank", index - len(chain))
        state |= {f"{group}.{local}.{field}": value for field, value in payload.items()}
    layer.load_state_dict(state, strict=True)
    floats = [fmt.dequantize(p, s, torch.float32) for p, s in zip(payloads, shapes)]
    lowrank_floats = floats[len(chain) :] or None
    reference = ButterflyLinear.from_twiddles(chain, floats[: len(chain)], bias, lowrank_floats)
    return layer, reference


# groups run along a twiddle's last axis: only the group sizes that divide it apply
FITTING_GROUPS = [
    (chain, fmt, group_size)
    for chain in CHAINS
    for fmt, group_size in FORMATS
    if not group_size or all(shape[-1] % group_size == 0 for shape in chain.twiddle_shapes)
]


@pytest.mark.parametrize("chain,fmt,group_size", FITTING_GROUPS, ids=str)
@pytest.mark.parametrize("rank", [0, 2])
def test_quantized_forward_vs_dequantized_float(chain, fmt, group_size, rank, rng):
    layer, reference = _quantized(chain, fmt, group_size, rank, rng)
    x = torch.randn(3, 4, chain.shape[1], generator=rng)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)
    for got, expected in zip(
        layer.twiddles + layer.lowrank_twiddles, reference.twiddles + reference.lowrank_twiddles
    ):
        assert torch.equal(got, expected)
    assert not list(layer.parameters())[:-1]  # the bias is the only parameter


@pytest.mark.parametrize("fmt,group_size", FORMATS)
def test_dequantize_payload_vs_format(fmt, group_size, rng):
    shape = (2, 3, 5, 6)
    payload = get_format(fmt).quantize(torch.randn(shape, dtype=torch.float64, generator=rng), group_size)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(
            dequantize_payload(payload, shape, dtype), get_format(fmt).dequantize(payload, shape, dtype)
        )


def test_payloads_keep_their_dtype_through_module_casts(rng):
    layer, reference = _quantized(monarch(12, 8, 4), "int8", None, 0, rng)
    layer.double()
    assert layer.factors[0].qdata.dtype == torch.int8 and layer.factors[0].scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float64 and layer.twiddles[0].dtype == torch.float64
    x = torch.randn(5, 8, dtype=torch.float64, generator=rng)
    fmt, shapes = get_format("int8"), reference.chain.twiddle_shapes
    exact = [fmt.dequantize(f.payload(), s, torch.float64) for f, s in zip(layer.factors, shapes)]
    dense = reference.chain.to_dense(exact)
    expected = x @ dense.T + reference.bias.double()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def _resident(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("ql")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    assert cli("factorize", ckpt, "-o", root / "fact", "--method", "lowrank").exit_code == 0
    for fmt in ("int8", "int4", "fp8-e4m3"):
        result = cli("quantize", root / "fact", "-o", root / fmt, "--format", fmt, "--rescale", "none")
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8-e4m3"])
def test_load_compressed_keeps_the_stored_bytes(artifacts, fmt):
    art = load_artifact(artifacts / fmt)
    model = load_compressed(artifacts / fmt)
    float_model = load_compressed(artifacts / "fact")
    for name in art.layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedButterflyLinear)
        assert all(f.nibbles == ("rows" if fmt == "int4" else "pairs") for f in layer.factors)
        for key, tensor in layer.state_dict().items():
            stored = art.load(f"{name}.{key}")
            assert tensor.dtype == stored.dtype and torch.equal(tensor, stored)
        stored_bytes = sum(art.load(f"{name}.{key}").nbytes for key in layer.state_dict())
        # int4 codes held in rows: ceil(b/2) * c bytes a factor instead of b * ceil(c/2)
        repacked = sum(
            (f.shape[-2] + 1) // 2 * f.shape[-1] - f.shape[-2] * ((f.shape[-1] + 1) // 2)
            for f in layer.factors
            if fmt == "int4"
        )
        assert _resident(layer) == stored_bytes + repacked  # nothing dequantized is kept
        # small demo layers: scales and the float32 bias weigh more than in MiniLM
        ratio = _resident(layer) / _resident(float_model.get_submodule(name))
        assert ratio < {"int8": 0.4, "int4": 0.25, "fp8-e4m3": 0.4}[fmt]
    x = torch.randn(7, 64)
    dequantized = load_compressed(artifacts / fmt)
    for name in art.layers:  # the same model with the dequantized twiddles as float parameters
        layer = dequantized.get_submodule(name)
        bias = layer.bias.detach() if layer.bias is not None else None
        float_layer = ButterflyLinear.from_twiddles(
            layer.chain, layer.twiddles, bias, layer.lowrank_twiddles or None
        )
        parent, _, child = name.rpartition(".")
        setattr(dequantized.get_submodule(parent) if parent else dequantized, child, float_layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "fmt,group_size", [("int8", None), ("int4", None), ("int8", 2), ("int4", 2), ("bf16", None)]
)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_plain_lowrank_scaled_gemms_vs_dequantized_float(fmt, group_size, rows, rng, monkeypatch):
    """A plain U V runs its GEMMs on the codes with the scale on the outputs (fewer rows
    than a factor's inner size) or on the codes (more rows); grouped scales fall back to
    dequantizing. Every way gives the dequantized float layer's outputs."""
    layer, reference = _quantized(lowrank(10, 8, 4), fmt, group_size, 0, rng)
    x = torch.randn(rows, 8, generator=rng)
    expected = reference(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    grouped = group_size is not None

    # the codes' path never dequantizes a whole twiddle: only the grouped fallback does
    def refuse(*args, **kwargs):
        raise AssertionError("dequantized")

    monkeypatch.setattr(layers_module, "dequantize_payload", refuse)
    if grouped:
        with pytest.raises(AssertionError, match="dequantized"):
            layer(x)
    else:
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b,c", [(1, 1), (5, 6), (6, 5), (7, 7), (16, 153)])
def test_int4_nibble_orders_round_trip_every_byte(b, c):
    cycle = torch.arange(-8, 8, dtype=torch.int8).repeat(b * c)[: b * c]
    codes = cycle[torch.randperm(b * c, generator=torch.Generator().manual_seed(c))].view(1, 1, b, c)
    packed = pack_int4(codes)  # (1, 1, b, ceil(c/2)): the artifact's order
    rows = int4_rows(packed, c)
    top = (b + 1) // 2
    assert rows.dtype == torch.uint8 and rows.shape == (1, 1, top, c)
    assert torch.equal(int4_pairs(rows, b), packed)
    # byte (i, k) holds codes (i, k) in its low nibble and (i + ceil(b/2), k) in its high one
    signed = rows.view(torch.int8)
    padded = torch.cat((codes, torch.zeros(1, 1, 2 * top - b, c, dtype=torch.int8)), dim=-2)
    assert torch.equal((signed << 4) >> 4, padded[..., :top, :])
    assert torch.equal(signed >> 4, padded[..., top:, :])


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 1, 7, 5), (1, 1, 4, 153), (1, 1, 153, 4)], ids=str)
@pytest.mark.parametrize("group_size", [None, 1, "row"])
def test_int4_rows_dequantize_bit_exact_vs_format(shape, group_size, rng):
    fmt = get_format("int4")
    group = shape[-1] if group_size == "row" else group_size
    payload = fmt.quantize(torch.randn(shape, dtype=torch.float64, generator=rng), group)
    rows = payload | {"qdata": int4_rows(payload["qdata"], shape[-1])}
    for dtype in (torch.float32, torch.float64):
        exact = fmt.dequantize(payload, shape, dtype)
        assert torch.equal(dequantize_payload(rows, shape, dtype, "rows"), exact)
        assert torch.equal(dequantize_payload(payload, shape, dtype, "pairs"), exact)
        if shape[:2] == (1, 1) and group != 1:
            for scratch in (False, True):
                codes, scale, unit = codes_and_row_scale(rows, shape, dtype, "rows", scratch)
                assert unit == 1 / 16
                rebuilt = codes * (scale.unsqueeze(-1) if scale.ndim else scale) * unit
                assert torch.equal(rebuilt, exact[0, 0])


def test_int4_layer_holds_rows_and_gives_back_the_artifact_bytes(rng):
    layer, reference = _quantized(lowrank(10, 7, 3), "int4", None, 0, rng)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    assert [f.nibbles for f in layer.factors] == ["rows", "rows"]
    for factor, key in zip(layer.factors, ("factors.0", "factors.1")):
        assert torch.equal(factor.payload()["qdata"], stored[f"{key}.qdata"])
        b, c = factor.shape[-2:]
        assert factor.qdata.shape == (1, 1, (b + 1) // 2, c)
    x = torch.randn(4, 7, generator=rng)
    expected = reference(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.load_state_dict(stored)  # copied into fresh buffers of the artifact's shape, repacked
    assert [f.nibbles for f in layer.factors] == ["rows", "rows"]
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.load_state_dict(stored, assign=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # codes set without load_state_dict (as transformers does) stay in the artifact's order
    for factor, key in zip(layer.factors, ("factors.0", "factors.1")):
        factor.qdata = stored[f"{key}.qdata"].clone()
        factor.nibbles = "pairs"
    before = layer(x)
    layer.repack()
    assert [f.nibbles for f in layer.factors] == ["rows", "rows"]
    assert torch.equal(layer(x), before)
    assert all(torch.equal(v, stored[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 40])
def test_inference_scratch_vs_autograd_path(fmt, rows, rng):
    first, reference = _quantized(lowrank(10, 8, 4), fmt, None, 0, rng)
    second, _ = _quantized(lowrank(10, 8, 4), fmt, None, 0, rng)
    x = torch.randn(rows, 8, generator=rng)
    graded = first(x.clone().requires_grad_())  # fresh codes, kept for backward
    with torch.inference_mode():
        y = first(x)
        other = second(x)  # reuses the scratch buffer
        again = first(x)
    assert torch.equal(y, graded.detach()) and torch.equal(again, y) and not torch.equal(other, y)
    torch.testing.assert_close(y, reference(x), rtol=1e-6, atol=1e-6)
