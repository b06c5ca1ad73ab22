"""The artifact's records (``schema``) and ``load_artifact``'s validation of forged artifacts."""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lyoncompress.artifact import load_artifact
from lyoncompress.errors import FormatError, LyoncompressError
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.models import load_compressed
from lyoncompress.quantization.pipeline import quantize
from lyoncompress.recipe import QuantizeConfig, Recipe
from lyoncompress.schema import (
    FORMAT_VERSION,
    MAX_FEATURES,
    DType,
    LayerRecord,
    QuantRecord,
    Structure,
    layer_table,
)
from tests.helpers import make_mlp_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A checkpoint, its monarch factorization and int8 quantization (built once)."""
    root = tmp_path_factory.mktemp("schema")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    factorize(ckpt, root / "fact", Recipe(method="monarch"))
    quantize(root / "fact", root / "q", QuantizeConfig(format="int8", group_size=4))
    quantize(ckpt, root / "dense", QuantizeConfig(format="bf16", dense=True))
    return root


def _table(folder: Path) -> dict:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return json.loads(handle.metadata()["lyoncompress"])["layers"]


@pytest.mark.parametrize("name", ["fact", "q", "dense"])
def test_records_round_trip_the_written_tables(built, name):
    table = _table(built / name)
    records = layer_table(table)
    assert {n: r.to_json() for n, r in records.items()} == table
    assert json.dumps({n: r.to_json() for n, r in records.items()}) == json.dumps(table)
    assert load_artifact(built / name).layers == records


def test_records_hold_enums_and_tuples(built):
    fc1 = load_artifact(built / "q").layers["fc1"]
    assert fc1.structure is Structure.MONARCH and fc1.dtype is DType.FLOAT32
    assert isinstance(fc1.chain, tuple) and all(isinstance(p, tuple) for p in fc1.chain)
    assert fc1.quantization == QuantRecord("int8", "equalize+auto", 4, fc1.quantization.bits_per_weight)
    assert load_artifact(built / "dense").layers["fc1"].structure is Structure.DENSE


def _record(**changes):
    entry = {
        "structure": "monarch",
        "in_features": 64,
        "out_features": 128,
        "chain": [[1, 32, 8, 4], [4, 8, 16, 1]],
        "lowrank_rank": 0,
        "bias": True,
        "dtype": "float32",
        "quantization": None,
    }
    return {**entry, **changes}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"in_features": True}, "in_features"),
        ({"lowrank_rank": False}, "lowrank_rank"),
        ({"bias": 1}, "bias"),
        ({"in_features": 64.0}, "in_features"),
        ({"in_features": MAX_FEATURES + 1}, "in_features"),
        ({"chain": []}, "chain"),
        ({"chain": [[1, 32, 8, 4], [4, 8, True, 1]]}, "chain[1].c"),
        ({"chain": "1,2,3,4"}, "chain"),
        ({"chain": [[1, 128, 64]]}, "chain"),
        ({"chain": [[2, 64, 32, 1], [1, 64, 64, 1]]}, "chain"),  # not chainable
        ({"lowrank_rank": 65}, "lowrank_rank"),
        ({"structure": "spiral"}, "structure"),
        ({"dtype": "int8"}, "dtype"),
        ({"quantization": {"format": "int8"}}, "quantization.rescale"),
        (
            {"quantization": {"format": "int8", "rescale": "none", "group_size": 0, "bits_per_weight": 8.0}},
            "quantization.group_size",
        ),
        (
            {"quantization": {"format": "int8", "rescale": "none", "group_size": None, "bits_per_weight": 8}},
            "quantization.bits_per_weight",
        ),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_records_name_their_field(changes, field):
    with pytest.raises(FormatError) as caught:
        LayerRecord.from_json(_record(**changes))
    assert caught.value.field == field


def test_missing_key_is_an_error():
    entry = _record()
    del entry["dtype"]
    with pytest.raises(FormatError, match="dtype: missing"):
        LayerRecord.from_json(entry)


# ---- forged artifacts: each is refused by load_artifact and by the CLI with exit 2 ----


def _rewrite(
    folder: Path, layers=None, metadata=None, tensors=None, config=None, version=FORMAT_VERSION
) -> None:
    """Rewrite the artifact's header table (and config.json's copy, both saying ``version``)
    and its tensors."""
    state = load_file(folder / "model.safetensors")
    table = _table(folder)
    if layers is not None:
        layers(table)
    if tensors is not None:
        tensors(state)
    text = metadata if metadata is not None else json.dumps({"format_version": version, "layers": table})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt", "lyoncompress": text})
    document = json.loads((folder / "config.json").read_text())
    document["quantization_config"].update(layers=table, format_version=version)
    if config is not None:
        config(document["quantization_config"])
    (folder / "config.json").write_text(json.dumps(document))


def _set(layer, **changes):
    return lambda table: table[layer].update(changes)


def _nan(state):
    state["fc1.factors.0.twiddle"][0, 0, 0, 0] = float("nan")


def _reshape(state):
    twiddle = state["fc1.factors.0.twiddle"]  # same element count, other shape
    state["fc1.factors.0.twiddle"] = twiddle.reshape(twiddle.shape[1], twiddle.shape[0], *twiddle.shape[2:])


FORGERIES = {
    "metadata not JSON": {"metadata": "{format_version: 1"},
    "layers a list": {"metadata": json.dumps({"format_version": 1, "layers": []})},
    "format_version missing": {"metadata": json.dumps({"layers": {}})},
    "format_version a string": {"metadata": json.dumps({"format_version": "1", "layers": {}})},
    "twiddle shape disagrees with chain": {"tensors": _reshape},
    "chain disagrees with in/out features": {"layers": _set("fc1", in_features=32)},
    "missing twiddle": {"tensors": lambda state: state.pop("fc1.factors.1.twiddle")},
    "leftover dense weight": {"tensors": lambda state: state.update({"fc1.weight": torch.zeros(128, 64)})},
    "lowrank_rank without low-rank tensors": {"layers": _set("fc1", lowrank_rank=2)},
    "chain claiming 100000x100000": {
        "layers": _set("fc1", in_features=100000, out_features=100000, chain=[[1, 100000, 100000, 1]])
    },
    "zero pattern entry": {"layers": _set("fc2", chain=[[1, 128, 0, 1]])},
    "negative pattern entry": {"layers": _set("fc2", chain=[[1, -128, 128, 1]])},
    "bool where int expected": {"layers": _set("fc1", lowrank_rank=False)},
    "bias without tensor": {"tensors": lambda state: state.pop("fc1.bias")},
    "format_version 1 in config.json": {"config": lambda qc: qc.update(format_version=1)},
    "format_version 3 in config.json": {"config": lambda qc: qc.update(format_version=3)},
    "format_version 3 in the header": {"version": 3},
    "placeholder missing": {"tensors": lambda state: state.pop("fc1.weight")},
    "placeholder holding data": {
        "tensors": lambda state: state.update({"fc1.weight": torch.zeros(4, dtype=torch.uint8)})
    },
    "placeholder of another dtype": {"tensors": lambda state: state.update({"fc1.weight": torch.zeros(0)})},
    "placeholder in a version-1 artifact": {"version": 1},
    "config.json disagrees with header": {"config": lambda qc: qc["layers"]["fc1"].update(bias=False)},
    "NaN twiddle": {"tensors": _nan},
}


@pytest.fixture
def forged(built, tmp_path, request):
    folder = shutil.copytree(built / "fact", tmp_path / "forged")
    _rewrite(folder, **FORGERIES[request.param])
    return folder


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("forged", sorted(FORGERIES), indirect=True)
def test_forged_artifact_is_refused(built, forged, tmp_path, cli):
    with pytest.raises(FormatError) as caught:
        load_compressed(forged)  # load_artifact, then the values (NaN)
    assert str(forged) in str(caught.value) and "\n" not in str(caught.value)
    invocations = [
        ["eval", forged, "--reference", built / "ckpt", "--task", "weights"],
        ["quantize", forged, "-o", tmp_path / "q", "--format", "int8"],
        ["inspect", forged],
    ]
    for args in invocations:
        _one_line_error(cli(*args))
    assert not (tmp_path / "q").exists()


def test_error_names_path_layer_and_field(built, tmp_path):
    folder = shutil.copytree(built / "fact", tmp_path / "forged")
    _rewrite(folder, **FORGERIES["missing twiddle"])
    with pytest.raises(FormatError, match=r"forged: layer 'fc1': tensor fc1\.factors\.1\.twiddle: missing"):
        load_artifact(folder)


# ---- corrupted headers: only LyoncompressError, never a crash ----


def _check_corrupted(cli, base: Path, edit) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(base, Path(scratch) / "a"))
        path = folder / "model.safetensors"
        path.write_bytes(edit(path.read_bytes()))
        with contextlib.suppress(LyoncompressError):  # refusing is fine, anything else fails
            load_artifact(folder)
        result = cli("inspect", folder)
        assert result.exit_code in (0, 2), result.output


def _header_end(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_header_byte_flips_raise_only_lyoncompress_errors(built, cli, flips):
    def edit(raw: bytes) -> bytes:
        data = bytearray(raw)
        for where, xor in flips:
            data[int(where * _header_end(raw))] ^= xor
        return bytes(data)

    _check_corrupted(cli, built / "q", edit)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(0, 1))
def test_truncated_headers_raise_only_lyoncompress_errors(built, cli, keep):
    _check_corrupted(cli, built / "fact", lambda raw: raw[: int(keep * _header_end(raw))])


def test_transformers_config_validates_through_the_schema():
    pytest.importorskip("transformers")
    from lyoncompress.hf_integration import LyoncompressConfig

    config = LyoncompressConfig(layers={"fc1": _record()})
    assert config.layers == {"fc1": _record()}  # kept as JSON: transformers serializes it
    assert json.loads(json.dumps(config.to_dict()))["layers"] == {"fc1": _record()}
    assert config.records["fc1"].structure is Structure.MONARCH
    with pytest.raises(FormatError, match=r"config.json: layer 'fc1': in_features: True is not an integer"):
        LyoncompressConfig(layers={"fc1": _record(in_features=True)})
    with pytest.raises(FormatError, match="format_version"):
        LyoncompressConfig(layers={}, format_version="1")
