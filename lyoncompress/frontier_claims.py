"""Parts of one frontier sweep running at the same time into one folder: the lock on
``OUT/.frontier.lock`` under which each part reads and writes the shared files, and the
claims (``OUT/.frontier-claims.json``: unit -> process id) by which a part takes the
points it will measure, so that no point is measured twice. A claim of a process that
is gone (killed) no longer counts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lyoncompress.processes import alive

CLAIMS = ".frontier-claims.json"


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.frontier.lock`` (where ``fcntl`` exists)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: parts must not run at the same time
        yield
        return
    with open(out / ".frontier.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(out: Path, unit: str) -> bool:
    """Take ``unit`` for this process unless another running process holds it; call
    under ``locked``. The claims of processes that are gone are dropped as it writes."""
    claims = _read(out)
    holder = claims.get(unit)
    if holder is not None and holder != os.getpid() and alive(holder):
        return False
    _write(out, {k: v for k, v in claims.items() if alive(v)} | {unit: os.getpid()})
    return True


def release(out: Path) -> None:
    """Drop this process's claims, and those of processes that are gone."""
    with locked(out):
        claims = _read(out)
        _write(out, {k: v for k, v in claims.items() if v != os.getpid() and alive(v)})


def _read(out: Path) -> dict[str, int]:
    path = out / CLAIMS
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # pragma: no cover - written whole by os.replace
        return {}


def _write(out: Path, claims: dict[str, int]) -> None:
    """Replace the claims file (removed when no claim is left); call under ``locked``."""
    path = out / CLAIMS
    if not claims:
        path.unlink(missing_ok=True)
        return
    staging = out / f".frontier-claims.{os.getpid()}.tmp"
    staging.write_text(json.dumps(claims))
    staging.replace(path)
