"""Output-path safety: which OUT a run may write, claimed for the run's whole length.

``claim_output`` runs before any work. It resolves symlinks, refuses an OUT that is,
contains or lies inside one of the run's inputs (with or without ``--force``), lets
``--force`` replace only an artifact that lyoncompress wrote (or an empty folder), and
takes an exclusive lock beside OUT so that a second run on the same OUT fails at once
instead of silently replacing the first. The lock is a symlink ``.OUT.lock`` whose
target is the owner's ``pid@start-time``: creating a symlink is atomic, and the target
tells a later run whether its owner is still alive. Scratch folders beside OUT carry
the pid in their name (``.OUT.tmp-PID`` …), so the next run removes those of dead
processes. The resume journal of ``factorize`` (``.OUT.journal``, see
``factorization.journal``) has no pid in its name and is never cleaned up here: it
outlives the run that wrote it, on purpose. Every refusal is an ``InputError`` (exit 2)
raised before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lyoncompress.errors import InputError
from lyoncompress.processes import alive

QUANT_METHOD = "lyoncompress"
# the scratch folders a run makes beside OUT: staging, a replaced OUT, distillation, search
# (not the resume journal ``.OUT.journal``: it must survive the run that wrote it)
SCRATCH_KINDS = ("tmp", "old", "stage", "search")
# errors of the file system, not of lyoncompress: the user fixes them (space, permissions)
USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Output:
    """A claimed output folder: ``path`` (symlinks resolved) may be written by this run.

    ``notes`` says what claiming cleaned up (stale locks and scratch folders of dead runs).
    """

    path: Path
    force: bool
    notes: list[str] = field(default_factory=list)

    def scratch(self, kind: str) -> Path:
        """A new empty folder beside OUT named ``.OUT.{kind}-{pid}-…``, for this run only."""
        return Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.{kind}-{os.getpid()}-"))

    def staging(self) -> Path:
        """Where the artifact is assembled before it is renamed to OUT (removed if present)."""
        staging = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        return staging


@contextlib.contextmanager
def claim_output(out: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Output]:
    """Check that ``out`` may be written and hold its lock until the block ends.

    Args:
        out: the artifact folder to create (``-o``).
        force: whether an existing artifact at ``out`` may be replaced.
        inputs: the run's input files and folders; ``out`` may not be, contain or lie
            inside any of them.

    Yields:
        The ``Output``; raises ``InputError`` when ``out`` cannot be used.

    Example:
        >>> with claim_output("fact/", force=False, inputs=["model/"]) as output:
        ...     write_artifact(output, ...)
    """
    path = _resolved_output(Path(out))
    _check_not_an_input(Path(out), path, inputs)
    check_replaceable(path, force)
    lock = path.parent / f".{path.name}.lock"
    notes = _acquire(lock, path)
    try:
        notes += _remove_stale_scratch(path)
        yield Output(path, force, notes)
    finally:
        with contextlib.suppress(OSError):
            if os.readlink(lock) == _owner_tag(os.getpid()):
                lock.unlink()


def data_paths(*options: str | Path | None) -> list[Path]:
    """The options that name files or folders (``builtin`` and unset ones do not)."""
    return [Path(option) for option in options if option is not None and str(option) != "builtin"]


def _resolved_output(out: Path) -> Path:
    if out.is_symlink() and not out.exists():
        raise InputError(
            f"{out} is a symlink to {os.readlink(out)}, which does not exist; remove it or choose another -o"
        )
    path = out.resolve()
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: the output's parent folder does not exist")
    return path


def _check_not_an_input(given: Path, path: Path, inputs: Iterable[str | Path]) -> None:
    for source in inputs:
        resolved = Path(source).resolve()
        if path == resolved:
            relation = "is"
        elif resolved in path.parents:
            relation = "is inside"
        elif path in resolved.parents:
            relation = "contains"
        else:
            continue
        raise InputError(
            f"-o {given} {relation} the input {source}; writing it would change the input. "
            "Choose an output folder outside it"
        )


def is_artifact(folder: Path) -> bool:
    """Whether ``folder`` holds an artifact that lyoncompress wrote (its config.json says so)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def check_replaceable(path: Path, force: bool) -> None:
    """An existing ``path`` needs ``force``, and ``force`` replaces only an artifact or an
    empty folder: never an arbitrary folder or file."""
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise InputError(f"{path} already exists; choose another -o or pass --force to replace it")
    if not path.is_dir():
        raise InputError(f"{path} exists and is not a folder; remove it first")
    if not is_artifact(path) and any(path.iterdir()):
        raise InputError(
            f"{path} is not an artifact written by lyoncompress (no config.json with quant_method "
            f"'{QUANT_METHOD}'); --force replaces only artifacts. Remove it yourself or choose another -o"
        )


def _owner_tag(pid: int) -> str:
    return f"{pid}@{_start_time(pid)}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so that a reused pid
    is not taken for the lock's owner; empty where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _alive(tag: str) -> bool:
    pid_text, _, started = tag.partition("@")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return alive(pid) and (not started or _start_time(pid) in ("", started))


def _acquire(lock: Path, path: Path) -> list[str]:
    notes = []
    for _ in range(2):
        try:
            os.symlink(_owner_tag(os.getpid()), lock)
            return notes
        except FileExistsError:
            try:
                owner = os.readlink(lock)
            except OSError:
                continue  # released between the two calls: try again
            if _alive(owner):
                raise InputError(
                    f"another lyoncompress run (pid {owner.partition('@')[0]}) is writing {path}; "
                    "wait for it to finish or choose another -o"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            notes.append(f"removed the lock of a run that ended without releasing it ({lock.name})")
        except OSError as err:
            raise file_system_error(err, path.parent) from err
    raise InputError(f"{lock}: could not take the output lock; remove it if no lyoncompress run is active")


def _remove_stale_scratch(path: Path) -> list[str]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({'|'.join(SCRATCH_KINDS)})-(\d+)(-.*)?")
    stale = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(2)) != os.getpid() and not _alive(match.group(2)):
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry.name)
    if not stale:
        return []
    names = ", ".join(stale)
    return [f"removed {len(stale)} scratch folder(s) left beside {path.name} by runs that died: {names}"]


def file_system_error(err: OSError, where: Path) -> Exception:
    """A full disk, a read-only mount or a permission problem as a one-line ``InputError``;
    any other ``OSError`` unchanged (a bug)."""
    if err.errno in USER_FIXABLE_ERRNOS:
        return InputError(f"cannot write {where}: {err.strerror or err}")
    return err
