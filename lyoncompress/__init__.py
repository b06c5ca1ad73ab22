"""lyoncompress: butterfly (Kronecker-sparse) factorization and quantization of trained networks."""

from lyoncompress.butterfly import Chain, KSPattern, lowrank, monarch, search_chains, square_butterfly
from lyoncompress.errors import InputError, LyoncompressError, PatternError
from lyoncompress.factorize import Projection, project
from lyoncompress.layers import ButterflyLinear

__version__ = "0.1.0"

__all__ = [
    "ButterflyLinear",
    "Chain",
    "InputError",
    "KSPattern",
    "LyoncompressError",
    "PatternError",
    "Projection",
    "__version__",
    "lowrank",
    "monarch",
    "project",
    "search_chains",
    "square_butterfly",
]
