"""Read checkpoints lazily, one tensor at a time.

Accepted inputs: a ``.safetensors`` file; a Hugging Face model folder
(``config.json`` plus ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, or ``pytorch_model.bin``); a PyTorch state dict
``.bin`` / ``.pt`` / ``.pth``, read with ``torch.load(weights_only=True, mmap=True)``
so that no pickled code ever runs.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lyoncompress.errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A read-only view of a checkpoint: names, shapes and dtypes up front, data on demand.

    Use ``open_checkpoint(path)``; call ``load(name)`` for one tensor at a time.
    """

    path: Path
    infos: dict[str, TensorInfo]
    config: dict | None
    _loader: Callable[[str], torch.Tensor] = field(repr=False)
    owners: dict[str, Path] = field(default_factory=dict, repr=False)  # safetensors: file of each tensor

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise InputError(f"{self.path}: no tensor named {name!r}")
        return self._loader(name)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(
            (_numel(i.shape) * i.dtype.itemsize for i in self.infos.values()),
            default=0,
        )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint for lazy reading.

    Args:
        path: ``.safetensors`` file, HF model folder, or ``.bin``/``.pt``/``.pth`` state dict.

    Returns:
        A ``Checkpoint``; raises ``InputError`` with the reason and a fix otherwise.

    Example:
        >>> ckpt = open_checkpoint("model.safetensors")
        >>> weight = ckpt.load("encoder.layer.0.intermediate.dense.weight")
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path)
    if path.suffix == ".safetensors":
        return _open_safetensors_files(path, [path], config=None)
    if path.suffix in TORCH_SUFFIXES:
        return _open_torch_file(path, config=None)
    raise InputError(
        f"{path}: unsupported file type {path.suffix or '(none)'!r}; give a .safetensors file, "
        f"a PyTorch state dict ({', '.join(TORCH_SUFFIXES)}) or a Hugging Face model folder"
    )


def tensor_bytes(path: str | Path) -> int:
    """Bytes of tensor data in every shard of a checkpoint or artifact (headers excluded):
    what its weights take, whatever they are stored as."""
    infos = open_checkpoint(path).infos.values()
    return sum(_numel(info.shape) * info.dtype.itemsize for info in infos)


def _read_config(folder: Path) -> dict | None:
    config_path = folder / "config.json"
    if not config_path.exists():
        return None
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{config_path}: not valid JSON ({err})") from err


def _open_folder(folder: Path) -> Checkpoint:
    config = _read_config(folder)
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted({folder / shard for shard in weight_map.values()})
        checkpoint = _open_safetensors_files(folder, shards, config)
        _check_index(index, weight_map, checkpoint)
        return checkpoint
    single = folder / "model.safetensors"
    if single.exists():
        return _open_safetensors_files(folder, [single], config)
    for name in ("pytorch_model.bin", "model.bin", "model.pt"):
        if (folder / name).exists():
            return _open_torch_file(folder / name, config, shown_as=folder)
    raise InputError(
        f"{folder}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin in this folder"
    )


def _check_index(index: Path, weight_map: dict[str, str], checkpoint: Checkpoint) -> None:
    """The index must say where each tensor really is: a wrong map would load a tensor from
    a shard that does not hold it, or leave one out."""
    for name, shard in weight_map.items():
        owner = checkpoint.owners.get(name)
        if owner is None or owner.name != shard:
            where = f"is in {owner.name}" if owner else "is in no shard"
            raise InputError(f"{index}: maps {name!r} to {shard}, but it {where}; rebuild the index")
    unlisted = sorted(set(checkpoint.infos) - set(weight_map))
    if unlisted:
        raise InputError(
            f"{index}: shards hold {unlisted[:3]} that the index does not list; rebuild the index"
        )


def _check_safetensors_header(file: Path) -> None:
    """Catch truncated files before safetensors does: its errors name no file."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len + 8 > size:
            raise InputError(f"{file}: truncated or corrupted safetensors header")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{file}: corrupted safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise InputError(
            f"{file}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
    for key, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise InputError(
                f"{file}: corrupted safetensors header (tensor {key!r} has no valid data_offsets)"
            )
    ends = [entry["data_offsets"][1] for entry in entries.values()]
    if ends and 8 + header_len + max(ends) > size:
        raise InputError(
            f"{file}: truncated safetensors file: header promises {8 + header_len + max(ends)} bytes, "
            f"file has {size}"
        )


def _open_safetensors_files(shown_as: Path, files: list[Path], config: dict | None) -> Checkpoint:
    infos: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for file in files:
        if not file.exists():
            raise InputError(f"{file}: shard listed in the index is missing")
        _check_safetensors_header(file)
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    if name in owner:
                        raise InputError(f"{file}: tensor {name!r} is also in {owner[name].name}")
                    sliced = handle.get_slice(name)
                    infos[name] = TensorInfo(tuple(sliced.get_shape()), _dtype(sliced.get_dtype(), file))
                    owner[name] = file
        except InputError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise InputError(f"{file}: not a readable safetensors file ({err})") from err

    def load(name: str) -> torch.Tensor:
        with safe_open(owner[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return Checkpoint(path=shown_as, infos=infos, config=config, _loader=load, owners=owner)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _dtype(name: str, file: Path) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise InputError(f"{file}: unsupported tensor dtype {name}")
    return SAFETENSORS_DTYPES[name]


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The one line of torch's long refusal that names what was refused (e.g. ``GLOBAL print``)."""
    lines = [line.strip() for line in str(err).splitlines()]
    reason = next(
        (line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else ""
    )
    return reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]


def _open_torch_file(file: Path, config: dict | None, shown_as: Path | None = None) -> Checkpoint:
    try:
        # mmap keeps memory flat, but only zip-format files (torch >= 1.6) support it
        mmap = zipfile.is_zipfile(file)
        with warnings.catch_warnings():
            # torch warns about old pickle protocols before refusing them; the refusal
            # below says what matters in one line, so its warning would only add lines
            warnings.simplefilter("ignore")
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise InputError(
            f"{file}: refused to unpickle: it holds more than plain tensors ({_unpickler_reason(err)}). "
            "Re-save it as a state dict or safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{file}: not a readable PyTorch file ({str(err).splitlines()[0]})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning-style wrapper
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise InputError(f"{file}: not a state dict (a mapping of names to tensors)")
    infos = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in loaded.items()}
    return Checkpoint(path=shown_as or file, infos=infos, config=config, _loader=loaded.__getitem__)
