"""Exceptions raised for user mistakes.

Every error a user can cause by their input is a `LyoncompressError`; the CLI
turns it into a one-line message and exit code 2. Anything else is a bug and
exits 3 with a traceback. This module imports nothing from the package, so the
leaf modules (`butterfly`, `kernels`) may use it.
"""

from __future__ import annotations


class LyoncompressError(Exception):
    """Base class: bad input that the user can fix. The message says how."""


class PatternError(LyoncompressError):
    """A Kronecker-sparse pattern or chain is invalid or does not fit a shape."""


class InputError(LyoncompressError):
    """A matrix, file, recipe or option is unusable as given."""


class FormatError(LyoncompressError):
    """An artifact breaks docs/FORMAT.md: its metadata or tensors are malformed.

    The message is one line naming where (the artifact path), which layer and which
    field; ``at`` fills in the parts known only to an outer caller.
    """

    def __init__(self, problem: str, field: str = "", layer: str = "", source: str = "") -> None:
        self.problem = " ".join(problem.split())  # one line, whatever the problem quotes
        self.field, self.layer, self.source = field, layer, source
        where = [part for part in (source, f"layer {layer!r}" if layer else "", field) if part]
        super().__init__(f"{': '.join(where)}: {self.problem}" if where else self.problem)

    def at(self, source: str = "", layer: str = "") -> FormatError:
        """The same error with ``source`` and ``layer`` filled in where still unknown."""
        return FormatError(self.problem, self.field, self.layer or layer, self.source or source)
