"""Checkpoint reading: every accepted format, and clear refusals."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.errors import InputError


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4).half()}


def test_safetensors_file_lazy(tmp_path):
    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.infos["b.weight"].shape == (2, 4) and ckpt.infos["b.weight"].dtype == torch.float16
    for name, tensor in state.items():
        assert torch.equal(ckpt.load(name), tensor)


def test_sharded_hf_folder(tmp_path):
    state = _state()
    save_file({"a.weight": state["a.weight"], "a.bias": state["a.bias"]}, tmp_path / "s1.safetensors")
    save_file({"b.weight": state["b.weight"]}, tmp_path / "s2.safetensors")
    index = {
        "weight_map": {"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s2.safetensors"}
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config == {"model_type": "x"}
    assert sorted(ckpt.names()) == sorted(state)
    assert torch.equal(ckpt.load("b.weight"), state["b.weight"])


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_torch_state_dict(tmp_path, suffix):
    state = _state()
    torch.save(state, tmp_path / f"m{suffix}")
    ckpt = open_checkpoint(tmp_path / f"m{suffix}")
    assert all(torch.equal(ckpt.load(n), t) for n, t in state.items())


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"a.weight": _Evil()}, tmp_path / "evil.bin")
    with open(tmp_path / "legacy.bin", "wb") as handle:
        pickle.dump({"a.weight": _Evil()}, handle)
    for name in ("evil.bin", "legacy.bin"):
        with pytest.raises(InputError, match="refused to unpickle"):
            open_checkpoint(tmp_path / name)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a state dict"):
        open_checkpoint(tmp_path / "list.pt")


def test_truncated_and_corrupted_safetensors(tmp_path):
    save_file(_state(), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(InputError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InputError, match="corrupted"):
        open_checkpoint(tmp_path / "junk.safetensors")


def test_header_with_wrong_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(InputError, match="bad.safetensors"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported file type"):
        open_checkpoint(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="no model.safetensors"):
        open_checkpoint(tmp_path)


def test_refused_pickle_is_one_short_line(tmp_path):
    torch.save({"a.weight": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(InputError) as refused:
        open_checkpoint(tmp_path / "evil.bin")
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message and "GLOBAL print" in message


@pytest.mark.parametrize("header", [[1, 2], {"w": {"dtype": "F32", "shape": [2]}}, {"w": [0, 8]}])
def test_safetensors_header_that_is_not_a_tensor_table(tmp_path, header):
    raw = json.dumps(header).encode()
    (tmp_path / "h.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(InputError, match="h.safetensors: corrupted safetensors header"):
        open_checkpoint(tmp_path / "h.safetensors")


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (
            {"a.weight": "s2.safetensors", "a.bias": "s1.safetensors", "b.weight": "s2.safetensors"},
            "is in s1",
        ),
        ({"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}, "does not list"),
        ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": 3}, "shard file names"),
    ],
)
def test_index_that_disagrees_with_its_shards(tmp_path, weight_map, message):
    state = _state()
    save_file({"a.weight": state["a.weight"], "a.bias": state["a.bias"]}, tmp_path / "s1.safetensors")
    save_file({"b.weight": state["b.weight"]}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match=message):
        open_checkpoint(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    save_file({"a.weight": torch.zeros(2, 2)}, tmp_path / "s1.safetensors")
    save_file({"a.weight": torch.ones(2, 2)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(InputError, match="also in s1.safetensors"):
        open_checkpoint(tmp_path)


def test_integer_weights_pass_through_and_are_said(tmp_path):
    from lyoncompress.plan import make_plan
    from lyoncompress.recipe import Recipe

    state = {"a.weight": torch.randn(8, 8), "q.weight": torch.randint(-8, 8, (8, 8), dtype=torch.int8)}
    save_file(state, tmp_path / "m.safetensors")
    plan = make_plan(open_checkpoint(tmp_path / "m.safetensors"), Recipe())
    assert [layer.name for layer in plan.layers] == ["a"]
    assert plan.warnings == ["1 non-float 2-D weight(s) left unchanged: q"]
    save_file({"q.weight": state["q.weight"]}, tmp_path / "int.safetensors")
    with pytest.raises(InputError, match="1 non-float ones, which are never compressed"):
        make_plan(open_checkpoint(tmp_path / "int.safetensors"), Recipe())
