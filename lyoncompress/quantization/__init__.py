"""Quantize butterfly factors: storage formats and the rescalings that make rounding cheaper.

One verb, ``quantize_chain(chain, twiddles, fmt, rescale=…)``; the registries
``FORMATS`` and ``RESCALINGS`` list the names it accepts.
"""

from lyoncompress.quantization.chain import QuantizedChain, quantize_chain
from lyoncompress.quantization.formats import FORMATS, QuantFormat, get_format
from lyoncompress.quantization.rankone import RankOneSolution, solve_rank_one
from lyoncompress.quantization.rescale import PRE_PASSES, RESCALINGS

__all__ = [
    "FORMATS",
    "PRE_PASSES",
    "RESCALINGS",
    "QuantFormat",
    "QuantizedChain",
    "RankOneSolution",
    "get_format",
    "quantize_chain",
    "solve_rank_one",
]
