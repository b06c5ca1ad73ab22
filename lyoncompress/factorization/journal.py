"""The resume journal of ``factorize``: every finished layer, on disk beside OUT.

A run writes each layer it finishes into ``.OUT.journal/`` (a stable name, unlike the
pid-named scratch folders that ``output`` cleans up): one safetensors file per layer
holding its twiddles, with the layer's factors description, report row and layer
record as JSON in the header, named by a hash of the layer's name (so the ranks of a
``torchrun`` run write into one journal without coordinating). Each file is written
under a temporary name, fsynced and renamed, so a crash leaves only whole entries.
``journal.json`` holds the run's fingerprint (the recipe, the checkpoint's tensor
names/shapes/dtypes and the sizes and mtimes of its files and of the calibration data);
``factorize --resume`` reuses the entries only when the fingerprint matches. The
journal is removed once the artifact is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from lyoncompress.butterfly import Chain
from lyoncompress.errors import InputError
from lyoncompress.factorization.methods import Candidate, LayerFactors
from lyoncompress.output import file_system_error

JOURNAL_VERSION = 1
_HEADER_KEY = "lyoncompress.journal"


@dataclass(frozen=True)
class FinishedLayer:
    """A layer whose factors are final: its name, factors, the seconds it took and the
    budget it was fitted at (allocation may have changed the planned one)."""

    name: str
    factors: LayerFactors
    seconds: float
    budget: float


def journal_path(out: Path) -> Path:
    """``.OUT.journal`` beside ``out``."""
    return out.parent / f".{out.name}.journal"


def fingerprint(recipe: dict[str, Any], infos: dict[str, Any], files: Iterable[Path]) -> str:
    """sha256 of what decides a run's result: the recipe (``to_dict``, device resolved),
    the checkpoint's tensors (name, shape, dtype) and the size and mtime of each input file."""
    stats = []
    for path in sorted({Path(p).resolve() for p in files}):
        with contextlib.suppress(OSError):
            stat = path.stat()
            stats.append([str(path), stat.st_size, stat.st_mtime_ns])
    document = {
        "version": JOURNAL_VERSION,
        "torch": torch.__version__,
        "recipe": recipe,
        "tensors": [[name, list(info.shape), str(info.dtype)] for name, info in infos.items()],
        "files": stats,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def input_files(path: Path) -> list[Path]:
    """The files of a checkpoint (a file, or the files of a folder) or of a data option."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path]


class Entries(MutableMapping[str, FinishedLayer]):
    """Finished layers by name, kept on disk: only each entry's file is held in memory,
    and reading one reads its file again (``_entry``). A layer set here that is not
    on disk (no file given) is held as it is."""

    def __init__(self) -> None:
        self._files: dict[str, Path] = {}
        self._held: dict[str, FinishedLayer] = {}

    def add(self, name: str, path: Path) -> None:
        self._held.pop(name, None)
        self._files[name] = path

    def __getitem__(self, name: str) -> FinishedLayer:
        if name in self._held:
            return self._held[name]
        return _entry(self._files[name])

    def __setitem__(self, name: str, finished: FinishedLayer) -> None:
        self._files.pop(name, None)
        self._held[name] = finished

    def __delitem__(self, name: str) -> None:
        if self._held.pop(name, None) is None:
            del self._files[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._files, *self._held])

    def __len__(self) -> int:
        return len(self._files) + len(self._held)


class Journal:
    """The finished layers of a run (``done``, by layer name) and where new ones go.

    ``done`` holds no factors in memory: each access reads its entry from the
    journal folder (``Entries``), so a long run's finished layers cost disk, not RAM.
    """

    def __init__(self, folder: Path, stamp: str, done: Mapping[str, FinishedLayer]) -> None:
        self.folder = folder
        self.stamp = stamp
        if isinstance(done, Entries):
            self.done = done
        else:
            self.done = Entries()
            self.done.update(done)

    @classmethod
    def open(cls, out: Path, stamp: str, resume: bool) -> tuple[Journal, list[str]]:
        """The journal beside ``out`` for a run with fingerprint ``stamp``.

        With ``resume`` an existing journal's entries are kept (a different
        fingerprint is an ``InputError``); without it an existing journal is replaced.

        Returns:
            The journal and the warnings to report.
        """
        folder = journal_path(out)
        notes: list[str] = []
        if folder.exists() and resume:
            done = _read(folder, stamp)
            notes.append(f"resumed from {folder.name}: {len(done)} layer(s) already done")
            return cls(folder, stamp, done), notes
        if folder.exists():
            shutil.rmtree(folder)
            notes.append(f"replaced the journal of an earlier run ({folder.name}); --resume continues one")
        elif resume:
            notes.append(f"--resume: no journal {folder.name} beside {out.name}; starting at layer 1")
        return cls(folder, stamp, {}), notes  # the folder is made with its first entry

    def record(self, finished: FinishedLayer, row: dict[str, Any], record: dict[str, Any]) -> None:
        """Write one finished layer (its report ``row`` and layer ``record`` beside its factors)."""
        factors = finished.factors
        tensors = _factor_tensors(factors, "")
        # the chosen structure's family is the chosen fit itself (the lowest error comes first)
        others = {s: f for s, f in factors.families.items() if s != factors.structure}
        for structure, family in others.items():
            tensors |= _factor_tensors(family, f"{structure}.")
        spec = _factor_spec(factors)
        if factors.families:  # --distill-select-steps: each other structure's best fit too
            spec["families"] = {s: _factor_spec(f) for s, f in others.items()}
        entry = {
            "name": finished.name,
            "seconds": finished.seconds,
            "budget": finished.budget,
            "factors": spec,
            "row": row,
            "record": record,
        }
        data = save(tensors, metadata={_HEADER_KEY: json.dumps(entry)})
        # one file name per layer: no two writers (ranks, or a run and its resumption) share one
        digest = hashlib.sha256(finished.name.encode()).hexdigest()[:16]
        try:
            if not self.folder.exists():
                self.create()
            path = self.folder / f"layer-{digest}.safetensors"
            _write_atomic(path, data)
        except OSError as err:
            raise file_system_error(err, self.folder) from err
        self.done.add(finished.name, path)

    def create(self) -> None:
        """Make the folder and its ``journal.json`` (before the first entry, or before
        several ranks write entries into it)."""
        try:
            self.folder.mkdir(exist_ok=True)
            header = {"version": JOURNAL_VERSION, "fingerprint": self.stamp}
            _write_atomic(self.folder / "journal.json", json.dumps(header).encode())
        except OSError as err:
            raise file_system_error(err, self.folder) from err

    def reload(self) -> None:
        """Read the entries on disk again (those other ranks wrote) into ``done``."""
        self.done = _read(self.folder, self.stamp)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read(folder: Path, stamp: str) -> Entries:
    try:
        header = json.loads((folder / "journal.json").read_text())
    except (OSError, ValueError):
        header = {}
    if not header and not any(folder.glob("layer-*.safetensors")):
        return {}  # killed while making the journal, before its first entry
    if header.get("fingerprint") != stamp:
        raise InputError(
            f"{folder} was written by a run with a different recipe or checkpoint; "
            "rerun without --resume to start over (the journal is then replaced)"
        )
    done = Entries()
    for path in sorted(folder.glob("layer-*.safetensors")):
        done.add(_entry(path).name, path)  # read whole once: a damaged entry is refused now
    for leftover in folder.glob("*.tmp"):
        leftover.unlink()
    return done


def _entry(path: Path) -> FinishedLayer:
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        entry = json.loads(json.loads(data[8 : 8 + header_size])["__metadata__"][_HEADER_KEY])
    except (SafetensorError, ValueError, KeyError) as err:
        raise InputError(f"{path}: unreadable journal entry ({err}); rerun without --resume") from err
    spec = entry["factors"]
    factors = _factors_of(spec, tensors, "")
    if "families" in spec:
        others = {s: _factors_of(f, tensors, f"{s}.") for s, f in spec["families"].items()}
        factors = dataclasses.replace(factors, families={factors.structure: factors, **others})
    return FinishedLayer(entry["name"], factors, entry["seconds"], entry["budget"])


def _factor_tensors(factors: LayerFactors, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{group}.{i}": t.detach().cpu().contiguous()
        for group, twiddles in (("twiddles", factors.twiddles), ("lowrank", factors.lowrank_twiddles))
        for i, t in enumerate(twiddles)
    }


def _factor_spec(factors: LayerFactors) -> dict[str, Any]:
    return {
        "structure": factors.structure,
        "chain": factors.chain.to_json(),
        "rel_error": factors.rel_error,
        "candidates": [asdict(c) for c in factors.candidates],
        "output_error": factors.output_error,
        "reference_error": factors.reference_error,
        "fit": factors.fit,
        "twiddles": len(factors.twiddles),
        "lowrank": len(factors.lowrank_twiddles),
    }


def _factors_of(spec: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> LayerFactors:
    return LayerFactors(
        structure=spec["structure"],
        chain=Chain(tuple(tuple(p) for p in spec["chain"])),
        twiddles=[tensors[f"{prefix}twiddles.{i}"] for i in range(spec["twiddles"])],
        rel_error=spec["rel_error"],
        candidates=[Candidate(**c) for c in spec["candidates"]],
        lowrank_twiddles=[tensors[f"{prefix}lowrank.{i}"] for i in range(spec["lowrank"])],
        output_error=spec["output_error"],
        reference_error=spec["reference_error"],
        fit=spec["fit"],
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written beside it, fsynced, renamed."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
