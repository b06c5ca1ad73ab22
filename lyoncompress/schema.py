"""The artifact's layer table as typed, validated records (docs/FORMAT.md).

``LayerRecord`` and its ``QuantRecord`` are what the writers build and what
``load_artifact`` returns. ``from_json`` / ``to_json`` convert them to and from the
JSON stored in every shard's header and in ``config.json``; ``to_json`` gives exactly
the dicts written before the records existed, so the bytes on disk are unchanged.

Constructing a record validates every field (exact JSON types, ranges, the chain
against the layer's shape), so an invalid record never exists; an error is a
``FormatError`` naming the field. What needs the tensors (present, shaped and typed
as the record implies) is checked by ``load_artifact``, which knows them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

import torch

from lyoncompress.butterfly import Chain, KSPattern, lowrank
from lyoncompress.errors import FormatError, PatternError

# the version every writer writes; readers also take the older ones (docs/FORMAT.md,
# "Version history"): version 1 lacks the `P.weight` placeholders
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Bounds checked before anything is allocated. 2**20 features is 4x the largest
# vocabulary of a released model, so no real layer is refused; a chain claiming more
# would make the readers build (and ``quantize`` materialise) an absurd matrix.
MAX_FEATURES = 1 << 20
MAX_DEPTH = 64  # factors per chain; real chains have 1 to ~12
MAX_BITS_PER_WEIGHT = 64.0  # float:t24 with no scales is 24; int8 with a scale per entry is 40


class Structure(StrEnum):
    """How a layer's factors were found; informative, readers rebuild from ``chain``."""

    BUTTERFLY = "butterfly"
    """Chains of uniform rank fitted on weight error (``--method butterfly``)."""
    MONARCH = "monarch"
    """Two-factor Monarch chain (``--method monarch``, with or without ``--calib``)."""
    LOWRANK = "lowrank"
    """Truncated SVD ``(1, m, r, 1) (1, r, n, 1)`` (``--method lowrank``)."""
    LOWRANK_AWARE = "lowrank-aware"
    """Low-rank factors fitted on calibration data (``--calib``)."""
    MONARCH_PROJECTION = "monarch-projection"
    """Monarch projected on weight error, chosen on calibration data (``--calib``)."""
    HYBRID = "hybrid"
    """A chain plus a low-rank term ``U V`` (``lowrank_rank > 0``), fitted on calibration data."""
    DENSE = "dense"
    """The weight itself as the one-factor chain ``(1, m, n, 1)`` (``quantize --dense``)."""
    EMBEDDING = "embedding"
    """An ``nn.Embedding`` table ``(num_embeddings, dim)`` as the one-factor chain
    ``(1, num_embeddings, dim, 1)`` (``quantize --include-dense``); always quantized, no
    bias. Loading dequantizes it into the embedding's ``P.weight`` (no module is swapped)."""


# structures whose one-factor chain is the stored matrix itself, written quantized only
PLAIN_STRUCTURES = (Structure.DENSE, Structure.EMBEDDING)


class DType(StrEnum):
    """Float dtype of a layer's twiddles; for a quantized layer, the dequantization target."""

    FLOAT64 = "float64"
    """IEEE double."""
    FLOAT32 = "float32"
    """IEEE single."""
    FLOAT16 = "float16"
    """IEEE half."""
    BFLOAT16 = "bfloat16"
    """bfloat16."""

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)

    @classmethod
    def of(cls, dtype: torch.dtype) -> DType:
        """The member for a torch dtype; a non-float weight cannot be factorized."""
        name = str(dtype).removeprefix("torch.")
        if name not in {member.value for member in cls}:
            raise FormatError(f"{name} is not a twiddle dtype; use one of {', '.join(cls)}", "dtype")
        return cls(name)


@dataclass(frozen=True)
class QuantRecord:
    """The ``quantization`` record of a quantized layer.

    Args:
        format: storage format name (a key of ``quantization.formats.FORMATS``; the
            registry is checked by ``load_artifact``, which may import it).
        rescale: how the payloads were found; informative.
        group_size: entries per scale along the twiddles' last axis ``c``, or None.
        bits_per_weight: stored bits per non-zero, float32 scales included.
    """

    format: str
    rescale: str
    group_size: int | None
    bits_per_weight: float

    def __post_init__(self) -> None:
        _text(self.format, "quantization.format")
        _text(self.rescale, "quantization.rescale")
        if self.group_size is not None:
            _integer(self.group_size, "quantization.group_size", 1, MAX_FEATURES)
        bits = self.bits_per_weight
        if type(bits) is not float:
            raise FormatError(f"{bits!r} is not a number", "quantization.bits_per_weight")
        if not (math.isfinite(bits) and 0 < bits <= MAX_BITS_PER_WEIGHT):
            raise FormatError(
                f"{bits} is outside (0, {MAX_BITS_PER_WEIGHT:g}]", "quantization.bits_per_weight"
            )

    @classmethod
    def from_json(cls, data: Any) -> QuantRecord:
        _check_keys(data, cls, "quantization")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerRecord:
    """One compressed layer of the layer table (docs/FORMAT.md, "A layer entry").

    Args:
        structure: how the factors were found.
        in_features, out_features: the dense layer's shape ``(out, in)``.
        chain: patterns ``(a, b, c, d)`` of ``X_1 … X_L`` in product order; chainable,
            of shape ``(out_features, in_features)``.
        lowrank_rank: ``r`` of the extra ``U V`` term, 0 when absent.
        bias: whether ``P.bias`` exists.
        dtype: the twiddles' dtype (for a quantized layer, what dequantization gives).
        quantization: None for float twiddles.

    Example:
        >>> record = LayerRecord.from_json(json.loads(header)["layers"]["fc1"])
        >>> record.chains["factors"].shape
        (128, 64)
    """

    structure: Structure
    in_features: int
    out_features: int
    chain: tuple[tuple[int, int, int, int], ...]
    lowrank_rank: int
    bias: bool
    dtype: DType
    quantization: QuantRecord | None

    def __post_init__(self) -> None:
        _member(self.structure, Structure, "structure")
        _integer(self.in_features, "in_features", 1, MAX_FEATURES)
        _integer(self.out_features, "out_features", 1, MAX_FEATURES)
        chain = _chain(self.chain)
        if chain.shape != (self.out_features, self.in_features):
            raise FormatError(
                f"chain {chain} has shape {chain.shape}, but the layer is "
                f"(out_features, in_features) = ({self.out_features}, {self.in_features})",
                "chain",
            )
        _integer(self.lowrank_rank, "lowrank_rank", 0, min(self.in_features, self.out_features))
        if type(self.bias) is not bool:
            raise FormatError(f"{self.bias!r} is not true or false", "bias")
        _member(self.dtype, DType, "dtype")
        if self.quantization is not None and not isinstance(self.quantization, QuantRecord):
            raise FormatError(f"{self.quantization!r} is not a quantization record or null", "quantization")
        if self.structure is Structure.EMBEDDING:
            table = ((1, self.out_features, self.in_features, 1),)
            if self.chain != table or self.lowrank_rank or self.bias:
                raise FormatError(
                    f"an embedding is the one-factor chain {[list(p) for p in table]} with "
                    "lowrank_rank 0 and no bias",
                    "structure",
                )

    @property
    def is_embedding(self) -> bool:
        """An embedding table: loaded into ``P.weight``, not swapped in as a layer."""
        return self.structure is Structure.EMBEDDING

    @classmethod
    def from_json(cls, data: Any) -> LayerRecord:
        """The record of one layer-table entry; ``FormatError`` names the bad field."""
        _check_keys(data, cls, "")
        chain = data["chain"]
        if not isinstance(chain, list) or len(chain) > MAX_DEPTH:
            raise FormatError(f"must be a list of at most {MAX_DEPTH} [a, b, c, d] patterns", "chain")
        if not all(isinstance(p, list) and len(p) == 4 for p in chain):
            raise FormatError(f"{chain!r} is not a list of [a, b, c, d] patterns", "chain")
        quantization = data["quantization"]
        return cls(
            structure=_parse_member(data["structure"], Structure, "structure"),
            in_features=data["in_features"],
            out_features=data["out_features"],
            chain=tuple(tuple(p) for p in chain),
            lowrank_rank=data["lowrank_rank"],
            bias=data["bias"],
            dtype=_parse_member(data["dtype"], DType, "dtype"),
            quantization=None if quantization is None else QuantRecord.from_json(quantization),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "structure": self.structure.value,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "chain": [list(p) for p in self.chain],
            "lowrank_rank": self.lowrank_rank,
            "bias": self.bias,
            "dtype": self.dtype.value,
            "quantization": None if self.quantization is None else self.quantization.to_json(),
        }

    @property
    def chains(self) -> dict[str, Chain]:
        """The chains by tensor group: ``factors`` (and ``lowrank`` when ``lowrank_rank > 0``)."""
        chains = {"factors": Chain.of(*self.chain)}
        if self.lowrank_rank:
            chains["lowrank"] = lowrank(self.out_features, self.in_features, self.lowrank_rank)
        return chains

    @property
    def factor_shapes(self) -> dict[str, tuple[int, int, int, int]]:
        """Twiddle shape ``(a, d, b, c)`` of every factor, keyed ``factors.{ℓ}`` / ``lowrank.{ℓ}``."""
        return {
            f"{group}.{index}": pattern.twiddle_shape
            for group, chain in self.chains.items()
            for index, pattern in enumerate(chain.patterns)
        }


def check_format_version(document: dict[str, Any], field: str) -> int:
    """``document["format_version"]``, an integer of ``READABLE_VERSIONS``; returned."""
    readable = " and ".join(map(str, READABLE_VERSIONS))
    if "format_version" not in document:
        raise FormatError(f"no format_version; this reads versions {readable}", field)
    version = document["format_version"]
    if type(version) is not int:
        raise FormatError(f"format_version {version!r} is not an integer", field)
    if version not in READABLE_VERSIONS:
        raise FormatError(
            f"artifact format version {version} is not supported (this reads {readable}); "
            "upgrade lyoncompress or rewrite the artifact",
            field,
        )
    return version


def layer_table(data: Any) -> dict[str, LayerRecord]:
    """Records of a JSON layer table ``{module path: entry}``; an error names the layer."""
    if not isinstance(data, dict):
        raise FormatError(f"must be an object of layer records, got {type(data).__name__}", "layers")
    records = {}
    for name, entry in data.items():
        if not name:
            raise FormatError("a layer name is empty", "layers")
        try:
            records[name] = LayerRecord.from_json(entry)
        except FormatError as err:
            raise err.at(layer=name) from None
    return records


def _check_keys(data: Any, record: type, prefix: str) -> None:
    where = prefix or "record"
    if not isinstance(data, dict):
        raise FormatError(f"must be an object, got {type(data).__name__}", where)
    names = [f.name for f in fields(record)]
    unknown = sorted(set(data) - set(names))
    missing = [name for name in names if name not in data]
    dotted = f"{prefix}." if prefix else ""
    if unknown:
        raise FormatError(f"unknown key; a record has exactly {', '.join(names)}", dotted + str(unknown[0]))
    if missing:
        raise FormatError("missing", dotted + missing[0])


def _integer(value: Any, field: str, low: int, high: int) -> None:
    if type(value) is not int:  # bool is an int subclass, and JSON true is not a size
        raise FormatError(f"{value!r} is not an integer", field)
    if not low <= value <= high:
        raise FormatError(f"{value} is outside [{low}, {high}]", field)


def _text(value: Any, field: str) -> None:
    if type(value) is not str or not value:
        raise FormatError(f"{value!r} is not a non-empty string", field)


def _member(value: Any, enum: type[StrEnum], field: str) -> None:
    if not isinstance(value, enum):
        raise FormatError(f"{value!r} is not a {enum.__name__} member", field)


def _parse_member(value: Any, enum: type[StrEnum], field: str) -> Any:
    if type(value) is not str or value not in {member.value for member in enum}:
        raise FormatError(f"{value!r} is not one of {', '.join(enum)}", field)
    return enum(value)


def _chain(patterns: Any) -> Chain:
    """The chain of validated patterns; each entry is an integer in [1, MAX_FEATURES]."""
    if type(patterns) is not tuple or not 1 <= len(patterns) <= MAX_DEPTH:
        raise FormatError(f"must hold 1 to {MAX_DEPTH} patterns", "chain")
    for index, pattern in enumerate(patterns):
        if type(pattern) is not tuple or len(pattern) != 4:
            raise FormatError(f"pattern {index} {pattern!r} is not (a, b, c, d)", "chain")
        for letter, value in zip("abcd", pattern):
            _integer(value, f"chain[{index}].{letter}", 1, MAX_FEATURES)
    try:
        chain = Chain(tuple(KSPattern(*p) for p in patterns))
        chain.check_chainable()
    except PatternError as err:
        raise FormatError(str(err), "chain") from None
    return chain
