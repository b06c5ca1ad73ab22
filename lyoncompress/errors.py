"""Exceptions raised for user mistakes.

Every error a user can cause by their input is a `LyoncompressError`; the CLI
turns it into a one-line message and exit code 2. Anything else is a bug and
exits 3 with a traceback. This module imports nothing from the package, so the
leaf modules (`butterfly`, `kernels`) may use it.
"""


class LyoncompressError(Exception):
    """Base class: bad input that the user can fix. The message says how."""


class PatternError(LyoncompressError):
    """A Kronecker-sparse pattern or chain is invalid or does not fit a shape."""


class InputError(LyoncompressError):
    """A matrix, file, recipe or option is unusable as given."""
