"""Artifact round trips: streamed shards, atomic writes, strict reloads."""

import json

import pytest
import torch
from safetensors import safe_open

from lyoncompress.artifact import load_artifact, write_artifact
from lyoncompress.butterfly import Chain
from lyoncompress.errors import InputError
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.layers import ButterflyLinear, apply_artifact
from lyoncompress.models import DemoMLP, load_compressed
from lyoncompress.recipe import Recipe
from lyoncompress.schema import DType, LayerRecord, Structure
from tests.helpers import SIZES, make_mlp_checkpoint


@pytest.fixture
def mlp(tmp_path):
    return make_mlp_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("method", ["butterfly", "monarch", "lowrank", "auto"])
def test_factorize_reload_matches_factors(tmp_path, mlp, method):
    folder, model = mlp
    out = tmp_path / "fact"
    report = factorize(folder, out, Recipe(method=method, budget=0.5))
    assert [row["name"] for row in report["layers"]] == ["fc1", "fc2"]
    assert all(row["params_after"] <= 0.5 * row["params_before"] for row in report["layers"])
    art = load_artifact(out)
    assert set(art.layers) == {"fc1", "fc2"}
    assert art.config["quantization_config"]["quant_method"] == "lyoncompress"
    # untouched tensors keep names and bytes
    assert torch.equal(art.load("head.weight"), model.head.weight.detach())
    assert torch.equal(art.load("fc1.bias"), model.fc1.bias.detach())
    reloaded = load_compressed(out)
    assert isinstance(reloaded.fc1, ButterflyLinear) and isinstance(reloaded.head, torch.nn.Linear)
    # the reloaded weights are the projection the report describes
    for row in report["layers"]:
        dense = getattr(model, row["name"]).weight.detach().double()
        approx = getattr(reloaded, row["name"]).to_dense().detach().double()
        assert float((dense - approx).norm() / dense.norm()) == pytest.approx(row["rel_error"], rel=1e-4)
    x = torch.rand(5, SIZES[0])
    manual = DemoMLP(SIZES)
    manual.load_state_dict(model.state_dict())
    for name in ("fc1", "fc2"):
        setattr(manual, name, getattr(reloaded, name))
    torch.testing.assert_close(reloaded(x), manual(x))


def test_sharding_and_header_metadata(tmp_path, mlp):
    folder, _ = mlp
    out = tmp_path / "fact"
    factorize(folder, out, Recipe(method="monarch", max_shard_size="40KB"))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(shards[0], framework="pt") as handle:
        document = json.loads(handle.metadata()["lyoncompress"])
    assert document["format_version"] == 2
    assert document["layers"]["fc1"]["chain"] == [
        list(p.as_tuple()) for p in Chain.of(*document["layers"]["fc1"]["chain"]).patterns
    ]
    reloaded = load_compressed(out)
    assert isinstance(reloaded.fc2, ButterflyLinear)


GOLDEN_LAYERS = (
    '{"format_version": 2, "layers": {'
    '"fc1": {"structure": "monarch", "in_features": 64, "out_features": 128, '
    '"chain": [[1, 32, 20, 4], [4, 20, 16, 1]], "lowrank_rank": 0, "bias": true, '
    '"dtype": "float32", "quantization": null}, '
    '"fc2": {"structure": "monarch", "in_features": 128, "out_features": 128, '
    '"chain": [[1, 64, 32, 2], [2, 32, 64, 1]], "lowrank_rank": 0, "bias": true, '
    '"dtype": "float32", "quantization": null}}}'
)
GOLDEN_TENSORS = {
    "fc1.bias": {"dtype": "F32", "shape": [128], "data_offsets": [0, 512]},
    "fc1.factors.0.twiddle": {"dtype": "F32", "shape": [1, 4, 32, 20], "data_offsets": [512, 10752]},
    "fc1.factors.1.twiddle": {"dtype": "F32", "shape": [4, 1, 20, 16], "data_offsets": [10752, 15872]},
    "fc2.bias": {"dtype": "F32", "shape": [128], "data_offsets": [15872, 16384]},
    "fc2.factors.0.twiddle": {"dtype": "F32", "shape": [1, 2, 64, 32], "data_offsets": [16384, 32768]},
    "fc2.factors.1.twiddle": {"dtype": "F32", "shape": [2, 1, 32, 64], "data_offsets": [32768, 49152]},
    "head.bias": {"dtype": "F32", "shape": [10], "data_offsets": [49152, 49192]},
    "head.weight": {"dtype": "F32", "shape": [10, 128], "data_offsets": [49192, 54312]},
    # the placeholders of version 2: empty, so that nothing reads them as the weights
    "fc1.weight": {"dtype": "U8", "shape": [0], "data_offsets": [54312, 54312]},
    "fc2.weight": {"dtype": "U8", "shape": [0], "data_offsets": [54312, 54312]},
}


def test_golden_header_of_a_factorized_artifact(tmp_path, mlp):
    """Pins the header ``factorize`` writes, byte for byte, as docs/FORMAT.md specifies it."""
    folder, _ = mlp
    out = tmp_path / "fact"
    factorize(folder, out, Recipe(method="monarch"))
    raw = (out / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert size % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt", "lyoncompress": GOLDEN_LAYERS}
    assert header == GOLDEN_TENSORS
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {
        "quant_method": "lyoncompress",
        **json.loads(GOLDEN_LAYERS),
    }


def test_byte_layout_of_a_written_shard(tmp_path):
    """8-byte header length, space-padded JSON header, raw little-endian data."""
    out = tmp_path / "a"
    twiddle = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    record = LayerRecord(Structure.BUTTERFLY, 4, 4, ((1, 2, 2, 2),), 0, False, DType.FLOAT32, None)
    layers = {"p": record.to_json()}
    write_artifact(out, iter([("p.factors.0.twiddle", twiddle)]), layers, {}, lambda: {}, 10**9)
    raw = (out / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert size % 8 == 0
    assert header["p.factors.0.twiddle"] == {"dtype": "F32", "shape": [1, 2, 2, 2], "data_offsets": [0, 32]}
    assert header["p.weight"] == {"dtype": "U8", "shape": [0], "data_offsets": [32, 32]}  # the placeholder
    assert header["__metadata__"]["format"] == "pt"
    assert json.loads(header["__metadata__"]["lyoncompress"]) == {"format_version": 2, "layers": layers}
    assert raw[8 + size :] == twiddle.numpy().tobytes()
    assert load_artifact(out).layers == {"p": record}


def _failing_stream(after: int, error: BaseException):
    for index in range(10):
        if index == after:
            raise error
        yield f"t{index}", torch.zeros(1000)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, error):
    out = tmp_path / "a"
    with pytest.raises(type(error)):
        write_artifact(out, _failing_stream(3, error), {}, {}, lambda: {}, 5000)
    assert list(tmp_path.iterdir()) == []


def test_failure_with_force_keeps_the_old_artifact(tmp_path, mlp):
    folder, _ = mlp
    out = tmp_path / "fact"
    factorize(folder, out, Recipe(method="lowrank"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError):
        write_artifact(out, _failing_stream(2, RuntimeError("boom")), {}, {}, lambda: {}, 5000, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fact"]


def test_existing_output_refused_without_force(tmp_path, mlp):
    folder, _ = mlp
    (tmp_path / "fact").mkdir()
    with pytest.raises(InputError, match="--force"):
        factorize(folder, tmp_path / "fact", Recipe())


def test_apply_artifact_is_strict(tmp_path, mlp):
    folder, _ = mlp
    out = tmp_path / "fact"
    factorize(folder, out, Recipe(method="lowrank"))
    wider = DemoMLP([64, 128, 128, 12])  # head differs: a shape mismatch in an untouched tensor
    with pytest.raises((InputError, RuntimeError)):
        apply_artifact(wider, out)

    class Extra(DemoMLP):
        def __init__(self):
            super().__init__(SIZES)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="missing"):
        apply_artifact(Extra(), out)

    class Fewer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            ref = DemoMLP(SIZES)
            self.fc1, self.fc2 = ref.fc1, ref.fc2

    with pytest.raises(InputError, match="unexpected"):
        apply_artifact(Fewer(), out)


def test_bin_checkpoint_and_nan_refused(tmp_path, mlp):
    _, model = mlp
    torch.save(model.state_dict(), tmp_path / "m.bin")
    report = factorize(tmp_path / "m.bin", tmp_path / "f1", Recipe(method="lowrank"))
    assert report["totals"]["layers"] == 2
    state = model.state_dict()
    state["fc2.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.bin")
    with pytest.raises(InputError, match="NaN"):
        factorize(tmp_path / "nan.bin", tmp_path / "f2", Recipe())
    assert not (tmp_path / "f2").exists()
    assert not any(p.name.startswith(".f2") for p in tmp_path.iterdir())


def test_folder_of_a_torch_state_dict_is_not_an_artifact(tmp_path, mlp):
    _, model = mlp
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="not a lyoncompress artifact"):
        load_artifact(folder)


def test_tokenizer_files_travel_with_the_artifact(tmp_path):
    from lyoncompress.quantization.pipeline import quantize
    from lyoncompress.recipe import QuantizeConfig

    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    files = {"vocab.txt": "[PAD]\n[UNK]\nhello\n", "tokenizer_config.json": '{"do_lower_case": true}'}
    for name, text in files.items():
        (ckpt / name).write_text(text)
    (ckpt / "notes.txt").write_text("not a model file")
    factorize(ckpt, tmp_path / "fact", Recipe(method="lowrank"))
    quantize(tmp_path / "fact", tmp_path / "q", QuantizeConfig(format="int8"))
    for folder in ("fact", "q"):
        for name, text in files.items():
            assert (tmp_path / folder / name).read_text() == text
        assert not (tmp_path / folder / "notes.txt").exists()


def test_text_calibration_without_a_vocabulary_is_refused(tmp_path):
    from lyoncompress.data import calibration_batches

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="no tokenizer vocabulary"):
        next(iter(calibration_batches(folder, {"model_type": "bert"}, "builtin", 64)))
