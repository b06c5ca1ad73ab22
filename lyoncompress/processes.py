"""Which processes are still running, and the scratch folders they own.

Several kinds of work leave folders or files named by the id of the process that made
them (the output lock, streamed activations, the parts of a frontier sweep). One whose
process is gone (``kill -9``, out of memory) is garbage to remove; one whose process
still runs belongs to a run alongside and is left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_scratch_folder(root: Path, prefix: str) -> Path:
    """A new folder ``root/<prefix><pid>-<random>`` for this process, after removing the
    folders of that prefix whose process is gone."""
    for stale in root.glob(f"{prefix}*-*"):
        pid = stale.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
