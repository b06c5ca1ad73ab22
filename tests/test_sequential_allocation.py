"""Sequential calibration (paired moments, corrected targets) and sensitivity-based
budget allocation: numbers against brute force on small cases, then the CLI."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from lyoncompress.capture import capture_paired, forward_order
from lyoncompress.models import DemoMLP
from lyoncompress.refine import activation_aware_lowrank, gram, output_error
from lyoncompress.refine.allocation import allocate_ranks, lowrank_error_curve, measure_sensitivity
from lyoncompress.refine.gram import corrected_target, paired_output_error
from tests.helpers import SIZES, make_mlp_checkpoint, random_llama

F64 = torch.float64


def _mlp(seed: int = 0) -> DemoMLP:
    torch.manual_seed(seed)
    return DemoMLP(SIZES).double().eval()


def test_capture_paired_matches_explicit_rows():
    reference = _mlp()
    working = copy.deepcopy(reference)
    with torch.no_grad():
        working.fc1.weight.mul_(0.5)  # an "earlier compressed layer"
    batches = list(torch.randn(8, 16, SIZES[0], dtype=F64))
    calib = capture_paired(reference, working, "fc2", batches, max_samples=10_000, val_every=4)
    hidden = lambda model, x: torch.nn.functional.gelu(model.fc1(x))  # noqa: E731 - input of fc2
    train = torch.cat([b for i, b in enumerate(batches) if i % 4 != 3])
    val = torch.cat([b for i, b in enumerate(batches) if i % 4 == 3])
    with torch.no_grad():
        x_t, xw_t = hidden(reference, train), hidden(working, train)
        x_v, xw_v = hidden(reference, val), hidden(working, val)
    torch.testing.assert_close(calib.gram_train, xw_t.T @ xw_t, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(calib.cross_train, x_t.T @ xw_t, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(calib.cross_val, x_v.T @ xw_v, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(calib.reference_gram_val, x_v.T @ x_v, rtol=1e-12, atol=1e-9)
    assert (calib.rows_train, calib.rows_val) == (96, 32) and calib.sequential


def test_corrected_target_is_least_squares_on_the_rows():
    torch.manual_seed(1)
    x = torch.randn(400, 12, dtype=F64)
    x_work = x + 0.3 * torch.randn(400, 12, dtype=F64)
    w = torch.randn(5, 12, dtype=F64)
    target = corrected_target(w, gram(x_work), x.T @ x_work, damping=0.0)
    expected = torch.linalg.lstsq(x_work, x @ w.T).solution.T  # argmin ‖X Wᵀ - X~ Bᵀ‖
    torch.testing.assert_close(target, expected, rtol=1e-10, atol=1e-10)
    # identical inputs: the target is the weight itself
    torch.testing.assert_close(corrected_target(w, gram(x), gram(x), damping=0.0), w, rtol=1e-10, atol=1e-10)


def test_paired_output_error_matches_rows():
    torch.manual_seed(2)
    x = torch.randn(300, 10, dtype=F64)
    x_work = x + 0.2 * torch.randn(300, 10, dtype=F64)
    w, b = torch.randn(4, 10, dtype=F64), torch.randn(4, 10, dtype=F64)
    expected = float((x @ w.T - x_work @ b.T).norm() / (x @ w.T).norm())
    got = paired_output_error(w, b, gram(x), x.T @ x_work, gram(x_work))
    assert got == pytest.approx(expected, rel=1e-10)


def test_lowrank_error_curve_is_the_aware_svd_error_at_every_rank():
    torch.manual_seed(3)
    x = torch.randn(200, 9, dtype=F64) @ torch.randn(9, 9, dtype=F64)
    w = torch.randn(6, 9, dtype=F64)
    curve = lowrank_error_curve(w, gram(x), damping=0.0)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == 0.0 and len(curve) == 7
    for rank in range(1, 6):
        u, v = activation_aware_lowrank(w, gram(x), rank, damping=0.0)
        assert float(curve[rank]) == pytest.approx(output_error(w, u[0, 0] @ v[0, 0], gram(x)) ** 2, rel=1e-8)


@pytest.mark.parametrize("seed", range(100))
def test_allocate_ranks_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shapes = {"a": (6, 4), "b": (5, 5), "c": (8, 3)}
    curves, sens = {}, {}
    for name, (m, n) in shapes.items():
        energy = np.sort(rng.random(min(m, n)) ** 3)[::-1]  # descending: a convex tail
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
        curves[name] = torch.tensor(tail / tail[0])
        sens[name] = float(rng.uniform(0.2, 3.0))
    budget = int(rng.integers(31, 70))
    ranks = allocate_ranks(curves, sens, shapes, budget)

    def cost(r):
        return sum(r[k] * sum(shapes[k]) for k in shapes)

    def objective(r):
        return sum(sens[k] ** 2 * float(curves[k][r[k]]) for k in shapes)

    options = {
        k: [r for r in range(1, min(m, n) + 1) if r * (m + n) <= m * n] for k, (m, n) in shapes.items()
    }
    feasible = [dict(zip(shapes, combo)) for combo in itertools.product(*options.values())]
    best = min((r for r in feasible if cost(r) <= budget), key=objective)
    # greedy buys exactly the optimum of the budget it has spent when it first skips a
    # rank, which is more than ``budget`` minus the largest rank cost
    slack = budget - max(m + n for m, n in shapes.values())
    within_slack = [r for r in feasible if cost(r) <= slack]
    assert cost(ranks) <= budget
    assert objective(best) <= objective(ranks) + 1e-15
    if within_slack:
        assert objective(ranks) <= objective(min(within_slack, key=objective)) + 1e-15


def test_allocate_ranks_refuses_a_budget_below_rank_one():
    curves = {"a": torch.tensor([1.0, 0.5, 0.0])}
    with pytest.raises(Exception, match="raise the budget"):
        allocate_ranks(curves, {"a": 1.0}, {"a": (4, 4)}, 3)


def test_measure_sensitivity_against_direct_runs_and_restores_weights():
    model = _mlp(4)
    batches = list(torch.randn(2, 32, SIZES[0], dtype=F64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    approx = model.fc2.weight.detach() * 0.9
    sens = measure_sensitivity(model, {"fc2": (approx, 0.1)}, batches)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    changed = copy.deepcopy(model)
    changed.fc2.weight.data = approx.clone()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([changed(b) for b in batches])
    assert sens["fc2"] == pytest.approx(float((out - ref).norm() / ref.norm()) / 0.1, rel=1e-10)


def test_forward_order_follows_the_forward_pass():
    model = _mlp()
    names = ["head", "fc1", "fc2"]
    assert forward_order(model, names, torch.randn(2, SIZES[0], dtype=F64)) == ["fc1", "fc2", "head"]


def _calib_file(tmp_path):
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).random((512, SIZES[0]), dtype=np.float32))
    return data


def test_factorize_sequential_and_allocated(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    data = _calib_file(tmp_path)
    common = ["--calib", data, "--method", "lowrank", "--refine-steps", "0", "--json"]
    result = cli(
        "factorize", ckpt, "-o", tmp_path / "seq", "--sequential", "--allocate", "sensitivity", *common
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"]["sequential"] and report["recipe"]["allocate"] == "sensitivity"
    budgets = report["allocation"]["budgets"]
    assert set(budgets) == set(report["allocation"]["sensitivity"]) == {r["name"] for r in report["layers"]}
    assert len({round(b, 4) for b in budgets.values()}) > 1  # re-divided, not uniform
    # the same total parameter budget as uniform 50%
    assert report["totals"]["params_after"] <= 0.5 * report["totals"]["params_before"]
    for row in report["layers"]:
        assert (
            0 <= row["reference_error"] < 1
            and row["params_after"] <= budgets[row["name"]] * row["params_before"]
        )
    uniform = json.loads(cli("factorize", ckpt, "-o", tmp_path / "uni", *common).stdout)
    assert all(r["reference_error"] is None for r in uniform["layers"]) and "allocation" not in uniform


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sequential"], "needs calibration data"),
        (["--allocate", "sensitivity"], "needs calibration data"),
        (["--allocate", "greedy", "--calib", "builtin"], "uniform, sensitivity"),
    ],
)
def test_sequential_and_allocation_refusals(tmp_path, args, message, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def _planted_permuted_mlp(folder):
    """A demo MLP whose fc1 / fc2 are Monarch matrices with their hidden units shuffled."""
    from safetensors.torch import save_file

    from lyoncompress.butterfly import monarch

    ckpt, model = make_mlp_checkpoint(folder)
    generator = torch.Generator().manual_seed(5)
    c1, c2 = monarch(128, 64, 8, 1), monarch(128, 128, 8, 1)
    w1 = c1.to_dense([torch.randn(s, generator=generator) for s in c1.twiddle_shapes])
    w2 = c2.to_dense([torch.randn(s, generator=generator) for s in c2.twiddle_shapes])
    shuffle = torch.randperm(128, generator=generator)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc1.weight"], state["fc1.bias"] = w1[shuffle], state["fc1.bias"]
    state["fc2.weight"] = w2[:, shuffle]
    save_file(state, ckpt / "model.safetensors")
    return ckpt


def test_factorize_permute_recovers_a_shuffled_monarch_mlp(tmp_path, cli):
    from lyoncompress.models import load_compressed, load_reference

    ckpt = _planted_permuted_mlp(tmp_path / "ckpt")
    common = ["--method", "monarch", "--budget", "0.25", "--target", "fc1", "--target", "fc2", "--json"]
    plain = json.loads(cli("factorize", ckpt, "-o", tmp_path / "plain", *common).stdout)
    result = cli("factorize", ckpt, "-o", tmp_path / "perm", "--permute", *common)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(p["first"], p["second"]) for p in report["permutations"]] == [("fc1", "fc2")]
    assert min(row["rel_error"] for row in plain["layers"]) > 0.3
    assert max(row["rel_error"] for row in report["layers"]) < 1e-5
    # the permutation is folded into the weights: the compressed model computes the same function
    x = torch.randn(32, SIZES[0])
    with torch.no_grad():
        expected = load_reference(ckpt)(x)
        torch.testing.assert_close(load_compressed(tmp_path / "perm")(x), expected, rtol=1e-4, atol=1e-4)


def test_permuted_checkpoint_keeps_a_gated_llama_mlp_function(tmp_path):
    pytest.importorskip("transformers")
    from lyoncompress.checkpoint import open_checkpoint
    from lyoncompress.factorization.permute import PairPermutation, mlp_pairs, permuted_checkpoint
    from lyoncompress.models import load_reference
    from lyoncompress.plan import make_plan
    from lyoncompress.recipe import Recipe

    random_llama().save_pretrained(tmp_path / "llama")
    source = open_checkpoint(tmp_path / "llama")
    plan = make_plan(source, Recipe(targets=(r"model\.layers\.\d+\.mlp\.(up|down)_proj",)))
    pairs = mlp_pairs(plan, source)
    assert [(p.first, p.second, p.siblings) for p in pairs] == [
        (
            f"model.layers.{i}.mlp.up_proj",
            f"model.layers.{i}.mlp.down_proj",
            (f"model.layers.{i}.mlp.gate_proj",),
        )
        for i in range(2)
    ]
    perms = [PairPermutation(p, torch.randperm(64), 1.0, 0.5) for p in pairs]
    view = permuted_checkpoint(source, perms)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(view.load(name), source.load(name)[perms[0].perm])
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = load_reference(source)(input_ids=ids).logits
        torch.testing.assert_close(load_reference(view)(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
