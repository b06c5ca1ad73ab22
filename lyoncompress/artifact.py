"""The compressed artifact: streamed, sharded, atomic safetensors writes and strict loading.

Layout (specified in docs/FORMAT.md): a folder with ``model.safetensors`` (or
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``),
``config.json`` with a ``quantization_config`` (``quant_method: "lyoncompress"``) and
``report.json``. Every shard's header metadata carries the layer table as JSON
under the key ``lyoncompress``. Since version 2, each layer's original ``P.weight``
holds an empty placeholder, so that a loader that does not know the format fails.

Writing streams one tensor at a time: tensor bytes go to a per-shard data file as
they are produced, and a shard is closed (header + data) once it is full, so memory
stays at one tensor whatever the checkpoint size. Everything is written into a
temporary folder beside the output and renamed into place only when complete.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lyoncompress.checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorInfo, open_checkpoint
from lyoncompress.errors import FormatError, InputError
from lyoncompress.output import QUANT_METHOD, check_replaceable, file_system_error
from lyoncompress.quantization.formats import FORMATS
from lyoncompress.schema import (
    FORMAT_VERSION,
    PLAIN_STRUCTURES,
    LayerRecord,
    check_format_version,
    layer_table,
)

METADATA_KEY = "lyoncompress"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Version 2: the tensor every layer P keeps under its original name P.weight. A loader
# that does not know lyoncompress (transformers without `import lyoncompress`, torch's
# load_state_dict) finds P.weight, cannot fit an empty tensor into the layer's weight and
# refuses the artifact, where it would otherwise leave that weight randomly initialised.
PLACEHOLDER = TensorInfo(shape=(0,), dtype=torch.uint8)
PLACEHOLDER_SINCE = 2


def placeholder_name(layer: str) -> str:
    """Where a layer's placeholder is stored: the name of the weight it replaces."""
    return f"{layer}.weight"


@dataclass(frozen=True)
class Artifact:
    """A loaded, validated artifact: its layer records, config, report and lazily readable
    tensors (every tensor but the placeholders, which carry no data)."""

    path: Path
    layers: dict[str, LayerRecord]
    config: dict[str, Any]
    report: dict[str, Any]
    tensors: Checkpoint
    format_version: int

    def load(self, name: str) -> torch.Tensor:
        return self.tensors.load(name)


# files a Hugging Face model folder carries beside its weights: an artifact keeps them,
# so that it tokenizes and generates like the model it came from
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    # sentence-transformers: the module list and settings; the modules' own folders
    # (pooling, normalisation) are named in modules.json and copied with them
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def companion_files(folder: Path) -> list[Path]:
    """The tokenizer, generation and sentence-transformers files of a model folder, and the
    module folders its ``modules.json`` names (none for a single file)."""
    if not folder.is_dir():
        return []
    files = [folder / name for name in COMPANION_FILES if (folder / name).is_file()]
    return files + _sentence_transformers_folders(folder)


def _sentence_transformers_folders(folder: Path) -> list[Path]:
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    # only plain sub-folder names: a path like "../x" must not copy files from elsewhere
    return [
        folder / path
        for path in paths
        if isinstance(path, str) and path and Path(path).name == path and (folder / path).is_dir()
    ]


def write_artifact(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layers: dict[str, dict[str, Any]],
    config: dict[str, Any],
    report: Callable[[], dict[str, Any]],
    max_shard_size: int,
    force: bool = False,
    companions: Iterable[Path] = (),
) -> None:
    """Stream ``tensors`` into a new artifact at ``out``, atomically.

    ``tensors`` is consumed lazily; ``layers`` may be filled while it is consumed
    and ``report()`` is called after the last tensor, so both can describe work
    done during the stream. The writer adds each layer's placeholder
    (``placeholder_name``) itself; ``tensors`` must not hold one. ``companions`` (e.g.
    ``companion_files(source)``) are copied beside the weights. On any error or Ctrl-C
    the temporary folder is removed and ``out`` is left as it was; a full disk, a
    read-only folder or missing permissions are an ``InputError``. ``out`` is claimed
    by the caller (``claim_output``).
    """
    check_replaceable(out, force)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_into(staging, tensors, layers, config, report, max_shard_size)
        for path in companions:
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            else:
                shutil.copyfile(path, staging / path.name)
        # what is about to become OUT must read back as an artifact: a short write that
        # the file system did not report cannot turn into an exit 0
        load_artifact(staging)
        _replace(staging, out, force)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise file_system_error(err, out) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_into(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layers: dict[str, dict[str, Any]],
    config: dict[str, Any],
    report: Callable[[], dict[str, Any]],
    max_shard_size: int,
) -> None:
    shards: list[_ShardWriter] = []
    seen: set[str] = set()
    for name, tensor in itertools.chain(tensors, _placeholders(layers)):
        if name in seen:
            raise ValueError(f"tensor {name} written twice")
        seen.add(name)
        size = tensor.numel() * tensor.element_size()
        # an empty tensor (a placeholder) fits in any shard: it never opens one of its own
        if not shards or (size and shards[-1].size and shards[-1].size + size > max_shard_size):
            shards.append(_ShardWriter(folder / f".shard-{len(shards)}.data"))
        shards[-1].add(name, tensor)
    if not shards:
        raise ValueError("an artifact needs at least one tensor")
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "layers": layers}),
    }
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for shard, name in zip(shards, names):
        shard.finish(folder / name, metadata)
        weight_map.update({tensor: name for tensor in shard.entries})
    if len(shards) > 1:
        total = sum(shard.size for shard in shards)
        _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(config)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "layers": layers,
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "report.json", report())


def _placeholders(layers: dict[str, dict[str, Any]]) -> Iterable[tuple[str, torch.Tensor]]:
    # a generator: `layers` is read once the stream before it has filled it in
    for name in list(layers):
        yield placeholder_name(name), torch.empty(PLACEHOLDER.shape, dtype=PLACEHOLDER.dtype)


class _ShardWriter:
    """Appends raw tensor bytes to a data file; ``finish`` prepends the safetensors header."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.handle = data_path.open("wb")
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
        start = self.size
        self.handle.write(memoryview(raw))
        self.size += flat.numel() * flat.element_size()
        self.entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [start, self.size],
        }

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        self.handle.close()
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # align the data to 8 bytes, as safetensors does
        with path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, length=16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with path.open("w") as handle:
        json.dump(document, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace(staging: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; an old ``out`` (``--force``) goes only after."""
    _fsync_dir(staging)
    check_replaceable(out, force)  # again: hours may have passed since the run claimed OUT
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        staging.rename(out)
        shutil.rmtree(trash)
    else:
        staging.rename(out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_artifact(path: str | Path) -> Artifact:
    """Open an artifact written by ``factorize`` or ``quantize``, validated.

    Every rule of docs/FORMAT.md, "What a reader must check", is checked here, before
    any tensor data is read: the metadata's JSON and format version, each layer record
    (``schema.LayerRecord``), config.json's copy of the table, and that each record's
    tensors are present with the dtypes and shapes its chain implies (and nothing else
    under its name, but the version-2 placeholder). Tensor values are checked when they
    are loaded (``apply_artifact``).

    Args:
        path: the artifact folder.

    Returns:
        ``Artifact`` with the per-layer records, the config, the report, and tensors
        readable one at a time (the placeholders left out).

    Raises:
        InputError: ``path`` is not a lyoncompress artifact at all.
        FormatError: it is one, but breaks the format; the message names the layer and field.

    Example:
        >>> art = load_artifact("fact/")
        >>> art.layers["fc1"].chain
        ((1, 128, 8, 1), (1, 8, 64, 1))
    """
    path = Path(path)
    tensors = open_checkpoint(path)
    if not path.is_dir():
        raise InputError(f"{path}: an artifact is a folder written by `lyoncompress factorize`")
    tables = [_metadata(shard).get(METADATA_KEY) for shard in _shards(path)]
    if not tables or tables[0] is None:
        raise InputError(
            f"{path}: not a lyoncompress artifact (no '{METADATA_KEY}' metadata); run factorize first"
        )
    try:
        if any(table != tables[0] for table in tables):
            raise FormatError("the shards' headers carry different layer tables", "'lyoncompress' metadata")
        version, layers = _header_layers(tables[0])
        config = tensors.config or {}
        _check_config(config, layers, version)
        for name, record in layers.items():
            try:
                _check_tensors(name, record, tensors.infos, version)
            except FormatError as err:
                raise err.at(layer=name) from None
        report = _read_report(path / "report.json")
    except FormatError as err:
        raise err.at(str(path)) from None
    placeholders = {placeholder_name(name) for name in layers} if version >= PLACEHOLDER_SINCE else set()
    weights = {name: info for name, info in tensors.infos.items() if name not in placeholders}
    return Artifact(path, layers, config, report, replace(tensors, infos=weights), version)


def _shards(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():  # open_checkpoint has read the index already
        return sorted({path / shard for shard in json.loads(index.read_text())["weight_map"].values()})
    return [path / "model.safetensors"] if (path / "model.safetensors").exists() else []


def _metadata(shard: Path) -> dict[str, str]:
    with safe_open(shard, framework="pt") as handle:
        return handle.metadata() or {}


def _header_layers(text: str) -> tuple[int, dict[str, LayerRecord]]:
    field = "'lyoncompress' metadata"
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise FormatError(f"not JSON ({err})", field) from None
    if not isinstance(document, dict):
        raise FormatError(f"not a JSON object but {type(document).__name__}", field)
    unknown = sorted(set(document) - {"format_version", "layers"})
    if unknown:
        raise FormatError(f"unknown key {unknown[0]!r}; it holds format_version and layers", field)
    version = check_format_version(document, field)
    if "layers" not in document:
        raise FormatError("no 'layers' table", field)
    return version, layer_table(document["layers"])


def _check_config(config: dict[str, Any], layers: dict[str, LayerRecord], version: int) -> None:
    """config.json repeats the header's table for transformers; the two must agree."""
    field = "config.json quantization_config"
    document = config.get("quantization_config")
    if not isinstance(document, dict):
        raise FormatError("missing or not an object; it repeats the header's layer table", field)
    unknown = sorted(set(document) - {"quant_method", "format_version", "layers"})
    if unknown:
        raise FormatError(f"unknown key {unknown[0]!r}", field)
    if document.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"quant_method {document.get('quant_method')!r} is not {QUANT_METHOD!r}", field)
    if check_format_version(document, field) != version:
        raise FormatError(
            f"format_version {document['format_version']} differs from the safetensors header's "
            f"{version} (the header is the reference; rewrite the artifact)",
            field,
        )
    try:
        copy = layer_table(document.get("layers"))
    except FormatError as err:
        raise FormatError(err.problem, f"{field}: {err.field}", err.layer) from None
    differing = sorted(set(copy) ^ set(layers)) or [n for n in layers if copy[n] != layers[n]]
    if differing:
        raise FormatError(
            "config.json's record differs from the safetensors header's (the header is the "
            "reference; rewrite the artifact)",
            field,
            differing[0],
        )


def _check_tensors(
    name: str, record: LayerRecord, infos: dict[str, TensorInfo], version: int = FORMAT_VERSION
) -> None:
    """The tensors under ``name`` are exactly those ``record`` (and the format ``version``)
    implies, dtypes and shapes included."""
    expected: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    quantization = record.quantization
    if quantization is None:
        if record.structure in PLAIN_STRUCTURES:
            raise FormatError(
                f"a {record.structure.value} layer is only written quantized (quantize --dense / "
                "--include-dense)",
                "quantization",
            )
        for key, shape in record.factor_shapes.items():
            expected[f"{name}.{key}.twiddle"] = (record.dtype.torch, shape)
    else:
        if quantization.format not in FORMATS:
            raise FormatError(f"unknown format {quantization.format!r}", "quantization.format")
        fmt = FORMATS[quantization.format]
        for key, shape in record.factor_shapes.items():
            try:
                layout = fmt.layout(shape, quantization.group_size)
            except InputError as err:
                raise FormatError(str(err), "quantization.group_size") from None
            expected.update({f"{name}.{key}.{field}": spec for field, spec in layout.items()})
    if record.bias:
        expected[f"{name}.bias"] = (None, (record.out_features,))  # keeps the source's float dtype
    for tensor, (dtype, shape) in expected.items():
        info = infos.get(tensor)
        if info is None:
            raise FormatError("missing; the record implies it", f"tensor {tensor}")
        if info.shape != shape:
            raise FormatError(f"shape {info.shape}, the record implies {shape}", f"tensor {tensor}")
        if info.dtype != dtype and (dtype is not None or not info.dtype.is_floating_point):
            raise FormatError(
                f"dtype {info.dtype}, the record implies {dtype or 'a float'}", f"tensor {tensor}"
            )
    if version >= PLACEHOLDER_SINCE:
        _check_placeholder(name, infos)
        expected[placeholder_name(name)] = (PLACEHOLDER.dtype, PLACEHOLDER.shape)
    owned = (f"{name}.factors.", f"{name}.lowrank.", f"{name}.weight", f"{name}.bias")
    extra = sorted(t for t in infos if t.startswith(owned) and t not in expected)
    if extra:
        raise FormatError(
            "not implied by the record (a compressed layer has no .weight before version 2, "
            "and .bias only when bias is true)",
            f"tensor {extra[0]}",
        )


def _check_placeholder(name: str, infos: dict[str, TensorInfo]) -> None:
    tensor = placeholder_name(name)
    info = infos.get(tensor)
    if info != PLACEHOLDER:
        found = "missing" if info is None else f"{info.dtype} of shape {info.shape}"
        raise FormatError(
            f"{found}; a version-2 layer keeps here the placeholder {PLACEHOLDER.dtype} of shape "
            f"{PLACEHOLDER.shape}, never a weight",
            f"tensor {tensor}",
        )


def _read_report(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise FormatError(f"not JSON ({err})", "report.json") from None
    if not isinstance(report, dict):
        raise FormatError("not a JSON object", "report.json")
    return report
