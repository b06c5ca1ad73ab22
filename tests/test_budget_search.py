"""factorize --min-recovery: bisection over the global budget, checked against brute force."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lyoncompress.evaluation import evaluate
from lyoncompress.factorization import budget_search
from lyoncompress.factorization.budget_search import BudgetSearch, search_budget
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.recipe import EvalConfig, Recipe
from tests.helpers import make_mlp_checkpoint

LOWRANK = Recipe(method="lowrank")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny MLP with geometrically decaying singular values in fc1 and fc2, so that
    a larger low-rank budget keeps strictly more of each layer (random weights have a
    flat spectrum, and the output cosine then wanders with the budget)."""
    folder, model = make_mlp_checkpoint(tmp_path_factory.mktemp("search") / "ckpt")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for name in ("fc1.weight", "fc2.weight"):
        m, n = state[name].shape
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))  # (m, m) orthonormal
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))  # (n, n) orthonormal
        k = min(m, n)
        s = 3 * 0.92 ** torch.arange(k, dtype=torch.float32)  # (k,)
        state[name] = ((u[:, :k] * s) @ v[:, :k].T).contiguous()  # (m, n)
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def data(ckpt):
    """64 inputs: a few times faster to evaluate than the built-in digits test split."""
    path = ckpt.parent / "inputs.npy"
    np.save(path, np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    return path


def _measure(ckpt, data, folder, budget):
    factorize(ckpt, folder, LOWRANK.replace(budget=budget))
    report = evaluate(folder, ckpt, EvalConfig(tasks=("outputs",), data=data))
    return report["tasks"]["outputs"]["final_cosine"]


def _left_behind(tmp_path, name="out"):
    return sorted(p.name for p in tmp_path.iterdir() if p.name == name or p.name.startswith(f".{name}"))


def test_chosen_budget_vs_brute_force(tmp_path, ckpt, data):
    search = BudgetSearch(0.99, task="outputs", data=data, low=0.1, high=0.9, tolerance=0.05)
    report = search_budget(ckpt, tmp_path / "out", search, LOWRANK)
    found = report["budget_search"]
    chosen, tol = found["chosen_budget"], search.tolerance
    assert found["passed"] and found["converged"]
    assert found["chosen_budget"] - found["largest_failing_budget"] <= tol
    assert _left_behind(tmp_path) == ["out"]
    # OUT is the chosen artifact, and its report.json carries the curve
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["budget_search"] == found and on_disk["recipe"]["budget"] == chosen
    assert [set(step) for step in found["curve"]] == [{"budget", "params_ratio", "metric", "passed"}] * len(
        found["curve"]
    )
    # brute force: the chosen budget passes, one tolerance step below fails, and a grid
    # of budgets (monotone on this checkpoint) agrees on which side of the answer it is
    brute = tmp_path / "brute"
    brute.mkdir()
    at_chosen = _measure(ckpt, data, brute / "chosen", chosen)
    assert at_chosen >= 0.99
    assert at_chosen == pytest.approx(report["eval"]["tasks"]["outputs"]["final_cosine"], abs=1e-12)
    assert _measure(ckpt, data, brute / "below", chosen - tol) < 0.99
    grid = [0.3, 0.4, 0.5, 0.6]
    metrics = [_measure(ckpt, data, brute / f"grid-{b}", b) for b in grid]
    assert metrics == sorted(metrics), "the checkpoint should make the metric monotone"
    for budget, metric in zip(grid, metrics):
        if budget >= chosen:
            assert metric >= 0.99, (budget, metric)
        if budget < chosen - tol:
            assert metric < 0.99, (budget, metric)


def test_cli_reports_curve_and_replaces_with_force(tmp_path, ckpt, data, cli):
    out = tmp_path / "out"
    assert cli("factorize", ckpt, "-o", out, "--method", "lowrank").exit_code == 0
    (out / "old.txt").write_text("old")  # --force replaces only an artifact, and all of it
    args = ["factorize", ckpt, "-o", out, "--method", "lowrank", "--min-recovery", "0.98"]
    args += [
        "--eval-task",
        "outputs",
        "--eval-data",
        data,
        "--min-budget",
        "0.1",
        "--max-budget",
        "0.9",
        "--search-tolerance",
        "0.1",
    ]
    assert cli(*args).exit_code == 2  # OUT exists: refused before any work
    result = cli(*args, "--force", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    curve = report["budget_search"]["curve"]
    assert [step["budget"] for step in curve[:2]] == [0.9, 0.1]  # the bounds first
    assert report["budget_search"]["chosen_budget"] == min(s["budget"] for s in curve if s["passed"])
    assert report["totals"]["ratio"] == next(
        s["params_ratio"] for s in curve if s["budget"] == report["budget_search"]["chosen_budget"]
    )
    assert not (out / "old.txt").exists()
    assert _left_behind(tmp_path) == ["out"]
    table = cli(*args[:-4], "--search-steps", "3", "--force")
    assert table.exit_code == 0, table.output
    assert "budget search" in table.output and "smallest passing budget" in table.output
    assert "not converged in 3 steps" in " ".join(
        table.output.split()
    )  # 3 rounds cannot narrow 0.1..0.95 to 0.01


def test_default_task_is_the_models_recovery_task(tmp_path, ckpt, cli):
    labelled = tmp_path / "labelled.npz"
    rng = np.random.default_rng(0)
    np.savez(labelled, x=rng.standard_normal((64, 64)).astype(np.float32), y=rng.integers(0, 10, 64))
    out = tmp_path / "out"
    args = ["factorize", ckpt, "-o", out, "--min-recovery", "0.01", "--search-steps", "2"]
    result = cli(*args, "--eval-data", labelled, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["budget_search"]
    assert (found["task"], found["metric"]) == ("classification", "recovery")
    assert found["chosen_budget"] == 0.02  # the low bound passes: nothing smaller is searched


def test_unreachable_target_exits_1_and_writes_nothing(tmp_path, ckpt, data, cli):
    out = tmp_path / "out"
    args = ["factorize", ckpt, "-o", out, "--method", "lowrank", "--min-recovery", "1"]
    args += ["--eval-task", "outputs", "--eval-data", data]
    result = cli(*args, "--json")
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)["budget_search"]
    assert not found["passed"] and found["chosen_budget"] is None
    assert [step["budget"] for step in found["curve"]] == [0.95]  # hi fails: nothing else tried
    assert _left_behind(tmp_path) == []
    result = cli(*args)
    assert result.exit_code == 1 and "nothing written" in result.output


def test_interrupted_search_leaves_nothing(tmp_path, ckpt, data, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(budget_search, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_budget(ckpt, tmp_path / "out", BudgetSearch(0.99, task="outputs", data=data), LOWRANK)
    assert len(calls) == 3
    assert _left_behind(tmp_path) == []


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--min-recovery", "0.9", "--budget", "0.3"], "conflict"),
        (["--min-recovery", "0"], "(0, 1]"),
        (["--min-recovery", "1.5"], "(0, 1]"),
        (["--eval-task", "outputs"], "add --min-recovery"),
        (["--min-recovery", "0.9", "--eval-task", "weights"], "no recovery metric"),
        (["--min-recovery", "0.9", "--eval-task", "perplexity"], "does not fit"),
        (["--min-recovery", "0.9", "--min-budget", "0.5", "--max-budget", "0.4"], "--min-budget"),
        (["--min-recovery", "0.9", "--max-budget", "1.0"], "--max-budget"),
        (["--min-recovery", "0.9", "--search-steps", "1"], "--search-steps"),
        (["--min-recovery", "0.9", "--search-tolerance", "0"], "--search-tolerance"),
        (["--min-recovery", "0.9", "--eval-data", "{tmp}/missing.npz"], "missing.npz"),
    ],
)
def test_bad_search_options_exit_2_and_write_nothing(tmp_path, ckpt, extra, match, cli):
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    result = cli("factorize", ckpt, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())
    assert _left_behind(tmp_path) == []


def test_weights_only_checkpoint_cannot_be_searched(tmp_path, ckpt, cli):
    bare = tmp_path / "bare.safetensors"
    save_file({"fc.weight": torch.randn(32, 32)}, bare)
    result = cli("factorize", bare, "-o", tmp_path / "out", "--min-recovery", "0.9")
    assert result.exit_code == 2 and "cannot be run" in result.output
    assert _left_behind(tmp_path) == []


def test_non_monotone_metric_keeps_the_smallest_measured_pass(tmp_path, ckpt, monkeypatch):
    """Budgets in [0.45, 0.5] or >= 0.8 pass: the search must return the smallest
    measured pass, and OUT must be that very artifact."""

    def fake_evaluate(artifact, reference, config):
        budget = json.loads((artifact / "report.json").read_text())["recipe"]["budget"]
        passed = 0.45 <= budget <= 0.5 or budget >= 0.8
        return {"tasks": {"outputs": {"final_cosine": 1.0 if passed else 0.5}}}

    monkeypatch.setattr(budget_search, "evaluate", fake_evaluate)
    report = search_budget(ckpt, tmp_path / "out", BudgetSearch(0.9, task="outputs"), LOWRANK)
    found = report["budget_search"]
    passing = [step["budget"] for step in found["curve"] if step["passed"]]
    assert found["chosen_budget"] == min(passing)
    assert 0.45 <= found["chosen_budget"] <= 0.45 + found["tolerance"]
    assert found["converged"] and found["largest_failing_budget"] < 0.45
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["recipe"]["budget"] == found["chosen_budget"]
    assert _left_behind(tmp_path) == ["out"]
