"""Several processes on one run (``torchrun``): who this process is, and how ranks agree.

``torchrun --nproc-per-node N -m lyoncompress factorize ...`` starts N copies of the
command with ``RANK``/``WORLD_SIZE`` (and the rendezvous address) in their environment.
``launched_ranks`` reads them; ``process_group`` joins the group, with the backend
``BACKENDS`` gives for the run's device (gloo for the CPU, NCCL for a GPU), plus a gloo
group for the small control messages whatever that backend is (NCCL carries only GPU
tensors). ``agreed`` marks the points where every rank learns whether any rank failed,
so that a bad input on one rank stops them all (each exits 2) instead of leaving the
others waiting; a rank that dies outright closes its sockets, which gloo reports to
the others at once (and torchrun stops the rest of the group).
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from lyoncompress.errors import InputError

# the collective backend of each device type: gloo runs on the CPU, NCCL on CUDA GPUs
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
# how long a rank may wait for the others at one agreement point: the slowest rank's
# share of the layer fits must end within it (a dead rank is noticed at once, not then)
AGREEMENT_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes (1: an ordinary run); within
    ``process_group``, ``control`` is the gloo group the agreements run on."""

    rank: int = 0
    world: int = 1
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that claims OUT, writes the artifact and prints the summary."""
        return self.rank == 0


class PeerFailed(Exception):
    """Another rank failed at an agreement point; that rank reported its own error.

    ``internal`` says whether its error was a bug (exit 3) rather than a bad input (exit 2);
    ``os_error`` whether it was caused by an ``OSError`` (a full disk, a permission).
    """

    def __init__(self, message: str, internal: bool, os_error: bool = False) -> None:
        super().__init__(message)
        self.internal = internal
        self.os_error = os_error


def launched_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun set in the environment (``RANK``, ``WORLD_SIZE``); a plain
    run has neither and is ``Ranks(0, 1)``."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
    except ValueError as err:
        raise InputError(f"RANK / WORLD_SIZE must be integers (torchrun sets them): {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK {rank} is not within WORLD_SIZE {world}; launch the ranks with torchrun")
    return Ranks(rank, world)


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for a run on ``device`` (see ``BACKENDS``)."""
    if device.type not in BACKENDS:
        raise InputError(
            f"no torch.distributed backend for device {device}; use one of {', '.join(BACKENDS)}"
        )
    return BACKENDS[device.type]


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Ranks]:
    """Join the group of ``ranks`` for the block, which gets ``ranks`` with their control
    group (one process: ``ranks`` as they are).

    The ranks meet at the address torchrun put in the environment; on a GPU each
    process takes the GPU of its ``LOCAL_RANK`` (modulo the GPUs there are). The group
    is left at the end, which also lets the process exit cleanly (an abandoned gloo
    group aborts the interpreter).
    """
    if ranks.world == 1:
        yield ranks
        return
    joined_here = not dist.is_initialized()
    if device.type == "cuda":  # more ranks than GPUs share them, round robin
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if joined_here:
        dist.init_process_group(backend_for(device), timeout=AGREEMENT_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=AGREEMENT_TIMEOUT)
    try:
        yield replace(ranks, control=control)
    finally:
        # the whole group if it was joined here, else (a caller's group) only the control one
        dist.destroy_process_group(None if joined_here else control)


def _all_gather(ranks: Ranks, value: Any) -> list[Any]:
    gathered: list[Any] = [None] * ranks.world
    try:
        dist.all_gather_object(gathered, value, group=ranks.control)
    except RuntimeError as err:  # gloo: a peer's sockets closed (it died) or the wait timed out
        first_line = next(iter(str(err).splitlines()), type(err).__name__)
        raise PeerFailed(f"another rank stopped without reporting ({first_line})", True) from err
    return gathered


def broadcast_from_leader(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; ``value`` of the others is ignored)."""
    if ranks.world == 1:
        return value
    return _all_gather(ranks, value if ranks.leader else None)[0]


@contextlib.contextmanager
def agreed(ranks: Ranks) -> Iterator[None]:
    """Run the block on every rank, then let all ranks learn whether any of them failed.

    A rank whose block raised re-raises its own error; the others raise ``PeerFailed``
    naming the lowest failing rank. Every rank must enter the same agreement points in
    the same order, and the block holds no collective of its own (no nested agreement).
    """
    if ranks.world == 1:
        yield
        return
    try:
        yield
    except PeerFailed:
        raise
    except BaseException as err:
        # this rank's own error is what it reports, even when the others are gone already
        with contextlib.suppress(PeerFailed):
            internal = not isinstance(err, InputError)
            _all_gather(ranks, (type(err).__name__, str(err), internal, isinstance(err.__cause__, OSError)))
        raise
    failures = [(rank, status) for rank, status in enumerate(_all_gather(ranks, None)) if status is not None]
    if failures:
        rank, (kind, message, internal, os_error) = failures[0]
        raise PeerFailed(f"rank {rank}: {f'{kind}: ' if internal else ''}{message}", internal, os_error)


def shared_out(sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """The rank that does each piece of work, balanced by size: largest first, each to
    the least loaded rank (lowest rank on ties), so the same sizes always give the same
    assignment.

    Example:
        >>> shared_out({"a": 4, "b": 3, "c": 2, "d": 1}, 2)
        {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    loads = [(0, rank) for rank in range(world)]  # (assigned size, rank), a min-heap
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: equal sizes keep their order
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + sizes[name], rank))
    return {name: owners[name] for name in sizes}
