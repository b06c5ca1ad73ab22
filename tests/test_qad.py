"""Quantization-aware distillation: LSQ fake quantization against the int grid and its
analytic / finite-difference gradients; ``distill_quantized`` never worse than its start,
its codes what its best state computed with; ``quantize --distill-steps`` end to end."""

import json
import math

import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.quantization.chain import quantize_chain
from lyoncompress.quantization.fakequant import FakeQuantized, lsq_fake_quantize
from lyoncompress.quantization.formats import get_format
from lyoncompress.quantization.qad import distill_quantized
from lyoncompress.refine.distill import OBJECTIVES, _held_out
from lyoncompress.schema import DType, LayerRecord, Structure
from tests.helpers import make_mlp_checkpoint

SHAPES = [((2, 3, 5, 8), None), ((2, 3, 5, 8), 4), ((1, 1, 7, 6), 3), ((3, 1, 2, 5), None)]


def _case(shape, group_size, fmt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    # scales below absmax / top, so that some entries saturate and the clamp is exercised
    scale = get_format(fmt).scales(w, group_size).double() * 0.8
    return w, scale


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("shape,group_size", SHAPES)
def test_fake_quantize_is_the_int_grid(fmt, shape, group_size):
    w, scale = _case(shape, group_size, fmt)
    top = get_format(fmt).top
    fake = lsq_fake_quantize(w, scale, top, group_size)
    assert torch.equal(fake, get_format(fmt).fake(w, group_size, scale))


def _expected_grads(w, scale, upstream, top, group_size):
    """LSQ's gradients written out: ∂/∂w = 1 inside the grid, 0 where it saturates;
    ∂/∂s = (round(v) - v) inside, ±top outside, times 1/sqrt(n top), summed per scale."""
    c = w.shape[-1]
    per_scale = c if group_size is None else group_size
    grouped = w.reshape(*w.shape[:-1], c // per_scale, per_scale)  # (a, d, b, groups, G)
    u = upstream.reshape(grouped.shape)
    v = grouped / scale.unsqueeze(-1)
    inside = v.abs() <= top
    grad_w = (u * inside).reshape(w.shape)
    ds = torch.where(inside, torch.round(v) - v, torch.sign(v) * top)
    grad_s = (u * ds).sum(-1) / math.sqrt(per_scale * top)
    return grad_w, grad_s


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("shape,group_size", SHAPES)
def test_ste_and_lsq_gradients_vs_the_analytic_formulas(fmt, shape, group_size):
    w, scale = _case(shape, group_size, fmt, seed=1)
    w.requires_grad_(True)
    scale.requires_grad_(True)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = get_format(fmt).top
    (lsq_fake_quantize(w, scale, top, group_size) * upstream).sum().backward()
    grad_w, grad_s = _expected_grads(w.detach(), scale.detach(), upstream, top, group_size)
    assert torch.allclose(w.grad, grad_w, rtol=0, atol=1e-12)
    assert torch.allclose(scale.grad, grad_s, rtol=1e-12, atol=1e-12)
    assert bool((w.grad == 0).any()), "the case should saturate some entries"


@pytest.mark.parametrize("shape,group_size", SHAPES)
def test_lsq_gradients_vs_finite_differences_of_the_straight_through_surrogate(shape, group_size):
    # the STE treats round(v) as v + (round(v₀) - v₀) with the offset frozen at the current
    # point; central differences of that surrogate must give autograd's gradients (up to g)
    fmt, top = "int4", 7.0
    w, scale = _case(shape, group_size, fmt, seed=3)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c = shape[-1]
    per_scale = c if group_size is None else group_size

    def grouped(x):
        return x.reshape(*shape[:-1], c // per_scale, per_scale)

    v0 = (grouped(w) / scale.unsqueeze(-1)).clamp(-top, top)
    offset = torch.round(v0) - v0

    def surrogate(w_, s_):
        v = (grouped(w_) / s_.unsqueeze(-1)).clamp(-top, top)
        return float(((v + offset) * s_.unsqueeze(-1) * grouped(upstream)).sum())

    w_req, s_req = w.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    (lsq_fake_quantize(w_req, s_req, top, group_size) * upstream).sum().backward()
    h = 1e-7
    index_w = (0,) * (len(shape) - 1) + (1,)
    step = torch.zeros_like(w)
    step[index_w] = h
    fd_w = (surrogate(w + step, scale) - surrogate(w - step, scale)) / (2 * h)
    assert w_req.grad[index_w].item() == pytest.approx(fd_w, abs=1e-6)
    g = 1 / math.sqrt(per_scale * top)
    for index in [(0,) * scale.ndim, tuple(n - 1 for n in scale.shape)]:
        step = torch.zeros_like(scale)
        step[index] = h * scale[index]
        fd_s = (surrogate(w, scale + step) - surrogate(w, scale - step)) / (2 * float(step[index]))
        assert s_req.grad[index].item() == pytest.approx(g * fd_s, rel=1e-5, abs=1e-9)


def test_fake_quantized_refuses_formats_without_int_scales():
    with pytest.raises(Exception, match="int8 or int4"):
        FakeQuantized("bf16", torch.ones(1, 1, 4, 1), None, (1, 1, 4, 8))


@pytest.fixture(scope="module")
def factorized(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("qad")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    result = cli("factorize", ckpt, "-o", root / "fact", "--method", "monarch")
    assert result.exit_code == 0, result.output
    return ckpt, root / "fact"


def _mlp_batches(count, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=gen) for _ in range(count)]


def _analytic(factorized, fmt="int4", group_size=4):
    """The factorized MLP's monarch layers and its dense head, rounded by plain RTN."""
    ckpt, fact = factorized
    student = load_compressed(fact)
    records = dict(load_artifact(fact).layers)
    records["head"] = LayerRecord(
        structure=Structure.DENSE,
        in_features=128,
        out_features=10,
        chain=((1, 10, 128, 1),),
        lowrank_rank=0,
        bias=True,
        dtype=DType.of(torch.float32),
        quantization=None,
    )
    modules = dict(student.named_modules())
    quantized = {}
    for name, record in records.items():
        module = modules[name]
        twiddles = [module.weight.detach().reshape(1, 1, 10, 128)] if name == "head" else module.twiddles
        quantized[name] = {
            "factors": quantize_chain(record.chains["factors"], twiddles, fmt, "none", group_size)
        }
    return load_reference(ckpt), student, records, quantized


def _with_codes(student, records, chains):
    """``student`` computing with the dequantized ``chains`` (what loading the artifact gives)."""
    modules = dict(student.named_modules())
    with torch.no_grad():
        for name, groups in chains.items():
            twiddles = groups["factors"].dequantized(torch.float32)
            if records[name].structure is Structure.DENSE:
                modules[name].weight.copy_(twiddles[0].reshape(modules[name].weight.shape))
            else:
                for factor, twiddle in zip(modules[name].factors, twiddles):
                    factor.twiddle.copy_(twiddle)
    return student


def test_distillation_lowers_the_held_out_error_and_stores_the_codes_it_judged(factorized):
    teacher, student, records, quantized = _analytic(factorized)
    train, val = _mlp_batches(12, 0), _mlp_batches(3, 1)
    objective = OBJECTIVES["hidden-mse"]
    start = _held_out(
        objective, teacher, _with_codes(load_compressed(factorized[1]), records, quantized), val
    )
    chains, result = distill_quantized(teacher, student, records, quantized, train, val, 60, lr=1e-3)
    assert result.val_before == pytest.approx(start, rel=1e-6)
    assert result.val_after < 0.95 * result.val_before
    # the stored codes compute exactly what the best distilled state did
    final = _held_out(objective, teacher, _with_codes(load_compressed(factorized[1]), records, chains), val)
    assert final == pytest.approx(result.val_after, rel=1e-5)
    for name, groups in chains.items():
        for payload, before in zip(groups["factors"].payloads, quantized[name]["factors"].payloads):
            assert payload["qdata"].dtype == before["qdata"].dtype == torch.uint8
            assert payload["qdata"].shape == before["qdata"].shape
            assert payload["scale"].shape == before["scale"].shape


def test_distillation_that_only_gets_worse_keeps_the_analytic_codes(factorized):
    teacher, student, records, quantized = _analytic(factorized)
    train, val = _mlp_batches(4, 0), _mlp_batches(2, 1)
    chains, result = distill_quantized(teacher, student, records, quantized, train, val, 10, lr=10.0)
    assert result.val_after == result.val_before
    for name, groups in chains.items():
        for payload, before in zip(groups["factors"].payloads, quantized[name]["factors"].payloads):
            assert torch.equal(payload["qdata"], before["qdata"])
            assert torch.equal(payload["scale"], before["scale"])


def test_quantize_distill_steps_end_to_end(tmp_path, factorized, cli):
    ckpt, fact = factorized
    common = ["--format", "int4", "--group-size", "4", "--calib", "builtin", "--reference", ckpt, "--json"]
    analytic = cli("quantize", fact, "-o", tmp_path / "a", *common)
    distilled = cli(
        "quantize", fact, "-o", tmp_path / "d", *common, "--distill-steps", "40", "--distill-lr", "1e-3"
    )
    assert analytic.exit_code == 0 and distilled.exit_code == 0, distilled.output
    report = json.loads(distilled.stdout)["distill"]
    assert report["steps"] == 40 and report["teacher"] == str(ckpt)
    assert report["val_output_error_after"] <= report["val_output_error_before"]
    errors = {}
    for name in ("a", "d"):
        art = load_artifact(tmp_path / name)
        assert art.layers["fc1"].quantization.format == "int4"
        assert art.tensors.infos["fc1.factors.0.qdata"].dtype == torch.uint8
        evaluated = cli("eval", tmp_path / name, "--reference", ckpt, "--task", "outputs", "--json")
        assert evaluated.exit_code == 0, evaluated.output
        errors[name] = json.loads(evaluated.stdout)["tasks"]["outputs"]["final_rel_error"]
    # same bytes: the same tensors, shapes and dtypes
    layouts = [
        {k: (i.shape, i.dtype) for k, i in load_artifact(tmp_path / n).tensors.infos.items()} for n in "ad"
    ]
    assert layouts[0] == layouts[1]
    # the record says the payloads are the distillation's, not the rescaling's alone
    rescales = [load_artifact(tmp_path / n).layers["fc1"].quantization.rescale for n in "ad"]
    assert rescales[1] == rescales[0] + "+distilled" and "distilled" not in rescales[0]
    assert errors["d"] <= errors["a"] * 1.02  # judged on other rows than distillation's own


@pytest.mark.parametrize(
    "args,match",
    [
        (["--format", "int4", "--calib", "builtin", "--distill-steps", "-1"], ">= 0"),
        (["--format", "int4", "--distill-steps", "5"], "--calib"),
        (["--format", "bf16", "--calib", "builtin", "--distill-steps", "5"], "int8 or int4"),
        (["--format", "int4", "--calib", "builtin", "--distill-steps", "5", "--distill-lr", "0"], "> 0"),
    ],
)
def test_bad_distill_options_exit_2_and_write_nothing(tmp_path, factorized, args, match, cli):
    _, fact = factorized
    result = cli("quantize", fact, "-o", tmp_path / "q", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not any(p.name.startswith((".q", "q")) for p in tmp_path.iterdir())


def test_recipe_quantize_section_takes_distill_keys(tmp_path):
    from lyoncompress.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("quantize:\n  format: int4\n  calib: builtin\n  distill_steps: 30\n  distill_lr: 0.001\n")
    config = load_recipe(path).quantize
    assert (config.distill_steps, config.distill_lr) == (30, 0.001)
    path.write_text("quantize:\n  format: int4\n  distill_steps: 30\n")
    with pytest.raises(Exception, match="calib"):
        load_recipe(path)
