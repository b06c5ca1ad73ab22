"""Storage formats for quantized twiddles, in a registry keyed by the names written to disk.

Every format turns a twiddle ``x`` of shape ``(a, d, b, c)`` into a *payload*: a dict
of tensors in their real storage dtype (``float8_e4m3fn``, ``int8``, ``uint8`` with two
int4 codes per byte, ``bfloat16`` …) plus ``scale`` where the format has scales, and
back. Scales are float32 and cover either the whole tensor or groups of ``G``
consecutive entries along the ``c`` axis (``G`` must divide ``c``), so a scale tensor
has shape ``(a, d, b, c // G)``.

``float:tN`` is the format of the rescaling papers: ``N`` significant bits (the
implicit one included), round to nearest even, unbounded exponent. It has no real
dtype, so its payload holds the rounded values in float64 and its nominal size is
``N`` bits (the exponent is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lyoncompress.errors import InputError

Payload = dict[str, torch.Tensor]
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # payload field -> (dtype, shape)


def round_significand(x: torch.Tensor, t: int) -> torch.Tensor:
    """Round to ``t`` significant bits, nearest even, unbounded exponent (``fl`` of the papers)."""
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, |mant| in [0.5, 1)
    return torch.round(mant * 2.0**t) * torch.exp2((exp - t).to(x.dtype))


class QuantFormat(Protocol):
    """What every registered format provides (see the module docstring for layouts)."""

    name: str
    description: str
    bits: int  # stored bits per value, scales excluded
    significand_bits: int | None  # t of a float grid with no scale: enables the exact λ scan

    def row_scaled(self, group_size: int | None) -> bool:
        """Whether scales are per row (or group) of a block, which makes row rescalings free."""
        ...

    def scales(self, x: torch.Tensor, group_size: int | None) -> torch.Tensor | None: ...

    def fake(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None) -> torch.Tensor: ...

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None
    ) -> Payload: ...

    def dequantize(
        self, payload: Payload, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor: ...

    def layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        """The payload ``quantize`` writes for a twiddle of ``shape``: its fields' dtypes and
        shapes, known without any data (``load_artifact`` checks stored tensors against it)."""
        ...


def _groups(x: torch.Tensor, group_size: int | None, per_tensor: bool) -> torch.Tensor:
    """View ``x (..., c)`` as ``(..., c // G, G)``; per-tensor scaling flattens everything."""
    if group_size is None:
        return x.reshape(*x.shape[:-4], 1, -1) if per_tensor else x.unsqueeze(-2)
    c = x.shape[-1]
    if group_size < 1 or c % group_size:
        raise InputError(
            f"group size {group_size} does not divide the c axis (c={c}) of a twiddle of shape "
            f"{tuple(x.shape[-4:])}; pick a divisor of {c} or leave group_size unset"
        )
    return x.reshape(*x.shape[:-1], c // group_size, group_size)


def _scale_shape(shape: tuple[int, ...], group_size: int | None, per_tensor: bool) -> tuple[int, ...]:
    if group_size is None:
        return () if per_tensor else (*shape[:-1], 1)
    return (*shape[:-1], shape[-1] // group_size)


@dataclass(frozen=True)
class _Scaled:
    """Shared scale logic: ``x ≈ scale * code`` with ``scale = absmax / top`` per group."""

    top: float  # largest code magnitude
    per_tensor_default: bool  # group_size=None means one scale per tensor (else per row of block)

    def row_scaled(self, group_size: int | None) -> bool:
        return group_size is not None or not self.per_tensor_default

    def scales(self, x: torch.Tensor, group_size: int | None) -> torch.Tensor:
        grouped = _groups(x, group_size, self.per_tensor_default)  # (..., groups, G)
        scale = (grouped.abs().amax(-1) / self.top).float()
        if group_size is None and self.per_tensor_default:
            return scale.reshape(x.shape[:-4])
        return scale

    def _scale_layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        if group_size is not None and (group_size < 1 or shape[-1] % group_size):
            raise InputError(f"group size {group_size} does not divide the c axis (c={shape[-1]})")
        return {"scale": (torch.float32, _scale_shape(shape, group_size, self.per_tensor_default))}

    def _resolve(
        self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped view of ``x`` (float64) and the float64 scale broadcast over the group axis."""
        grouped = _groups(x.double(), group_size, self.per_tensor_default)
        if scale is None:
            scale = self.scales(x, group_size)
        expected = _scale_shape(tuple(x.shape[-4:]), group_size, self.per_tensor_default)
        if tuple(scale.shape[-len(expected) :] if expected else ()) != expected:
            raise InputError(f"scale of shape {tuple(scale.shape)} does not fit groups of shape {expected}")
        scale = scale.double()
        if not (group_size is None and self.per_tensor_default):
            scale = scale.unsqueeze(-1)
        else:
            scale = scale.reshape(*scale.shape, 1, 1)
        # all-zero groups have scale 0: divide by 1 instead, the codes are 0 anyway
        return grouped, torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass(frozen=True)
class SignificandFormat:
    """``float:tN``: ``N`` significant bits, unbounded exponent, no scales."""

    t: int
    name: str = ""
    description: str = ""
    significand_bits: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"float:t{self.t}")
        object.__setattr__(self, "significand_bits", self.t)
        object.__setattr__(
            self, "description", f"{self.t} significant bits, round to nearest even, unbounded exponent"
        )

    @property
    def bits(self) -> int:
        return self.t

    def row_scaled(self, group_size: int | None) -> bool:
        return False

    def scales(self, x: torch.Tensor, group_size: int | None) -> None:
        _no_scales(self.name, group_size, None)

    def fake(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None) -> torch.Tensor:
        _no_scales(self.name, group_size, scale)
        return round_significand(x.double(), self.t)

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None
    ) -> Payload:
        return {"values": self.fake(x, group_size, scale)}

    def dequantize(
        self, payload: Payload, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return payload["values"].reshape(shape).to(dtype)

    def layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        _no_scales(self.name, group_size, None)
        return {"values": (torch.float64, tuple(shape))}


@dataclass(frozen=True)
class CastFormat:
    """A native 16-bit float (``bf16``, ``fp16``): one cast, no scales."""

    name: str
    dtype: torch.dtype
    significand_bits: int
    description: str
    bits: int = 16

    def row_scaled(self, group_size: int | None) -> bool:
        return False

    def scales(self, x: torch.Tensor, group_size: int | None) -> None:
        _no_scales(self.name, group_size, None)

    def fake(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None) -> torch.Tensor:
        _no_scales(self.name, group_size, scale)
        return x.to(self.dtype).double()

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None
    ) -> Payload:
        _no_scales(self.name, group_size, scale)
        return {"values": x.to(self.dtype)}

    def dequantize(
        self, payload: Payload, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return payload["values"].reshape(shape).to(dtype)

    def layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        _no_scales(self.name, group_size, None)
        return {"values": (self.dtype, tuple(shape))}


@dataclass(frozen=True)
class Fp8Format(_Scaled):
    """fp8 codes from torch's own cast of ``x / scale``; one scale per tensor or per group."""

    name: str = ""
    dtype: torch.dtype = torch.float8_e4m3fn
    description: str = ""
    bits: int = 8
    significand_bits: int | None = None

    def _codes(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None):
        grouped, s = self._resolve(x, group_size, scale)
        # the cast is done from float32, as everyone else casts to fp8
        return (grouped / s).float().to(self.dtype), s

    def fake(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None) -> torch.Tensor:
        codes, s = self._codes(x, group_size, scale)
        return (codes.double() * s).reshape(x.shape)

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None
    ) -> Payload:
        scale = self.scales(x, group_size) if scale is None else scale
        codes, _ = self._codes(x, group_size, scale)
        return {"qdata": codes.reshape(x.shape), "scale": scale.float()}

    def dequantize(
        self, payload: Payload, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        group_size = _group_size_of(shape, payload["scale"], self.per_tensor_default)
        grouped, s = self._resolve(payload["qdata"].double().reshape(shape), group_size, payload["scale"])
        return (grouped * s).reshape(shape).to(dtype)

    def layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        return {"qdata": (self.dtype, tuple(shape)), **self._scale_layout(shape, group_size)}


@dataclass(frozen=True)
class IntFormat(_Scaled):
    """Symmetric integers ``code ∈ [-top, top]``; int4 codes are packed two per byte."""

    name: str = ""
    bits: int = 8
    description: str = ""
    significand_bits: int | None = None

    def _codes(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None):
        grouped, s = self._resolve(x, group_size, scale)
        return torch.round(grouped / s).clamp(-self.top, self.top), s

    def fake(self, x: torch.Tensor, group_size: int | None, scale: torch.Tensor | None) -> torch.Tensor:
        codes, s = self._codes(x, group_size, scale)
        return (codes * s).reshape(x.shape)

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None
    ) -> Payload:
        scale = self.scales(x, group_size) if scale is None else scale
        codes, _ = self._codes(x, group_size, scale)
        codes = codes.reshape(x.shape).to(torch.int8)
        return {"qdata": pack_int4(codes) if self.bits == 4 else codes, "scale": scale.float()}

    def dequantize(
        self, payload: Payload, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        codes = payload["qdata"]
        codes = unpack_int4(codes, shape[-1]) if self.bits == 4 else codes
        group_size = _group_size_of(shape, payload["scale"], self.per_tensor_default)
        grouped, s = self._resolve(codes.double().reshape(shape), group_size, payload["scale"])
        return (grouped * s).reshape(shape).to(dtype)

    def layout(self, shape: tuple[int, ...], group_size: int | None) -> Layout:
        *lead, c = shape
        qdata = (torch.uint8, (*lead, (c + 1) // 2)) if self.bits == 4 else (torch.int8, tuple(shape))
        return {"qdata": qdata, **self._scale_layout(shape, group_size)}


def _group_size_of(shape: tuple[int, ...], scale: torch.Tensor, per_tensor: bool) -> int | None:
    if scale.ndim == 0 or (not per_tensor and scale.shape[-1] == 1):
        return None
    return shape[-1] // scale.shape[-1]


def _no_scales(name: str, group_size: int | None, scale: torch.Tensor | None) -> None:
    if group_size is not None or scale is not None:
        raise InputError(f"format {name} has no scales; drop group_size / scale or pick int8, int4 or fp8")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in ``[-8, 7]`` of shape ``(..., c)`` -> uint8 ``(..., ceil(c/2))``.

    Entry ``2k`` goes to the low nibble of byte ``k``, entry ``2k+1`` to the high one
    (two's complement nibbles); an odd ``c`` is padded with a zero code.
    """
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise InputError("int4 codes must lie in [-8, 7]")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``(..., ceil(c/2))`` -> int8 codes ``(..., c)``."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    nibbles = torch.stack((low, high), dim=-1).flatten(-2)[..., :c]  # (..., c)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def _build_registry() -> dict[str, QuantFormat]:
    formats: list[QuantFormat] = [SignificandFormat(t) for t in range(1, 25)]
    formats += [
        CastFormat("bf16", torch.bfloat16, 8, "bfloat16 cast"),
        CastFormat("fp16", torch.float16, 11, "IEEE half cast"),
        Fp8Format(
            top=448.0,
            per_tensor_default=True,
            name="fp8-e4m3",
            dtype=torch.float8_e4m3fn,
            description="float8 e4m3fn codes (torch cast) times a per-tensor or per-group scale",
        ),
        Fp8Format(
            top=57344.0,
            per_tensor_default=True,
            name="fp8-e5m2",
            dtype=torch.float8_e5m2,
            description="float8 e5m2 codes (torch cast) times a per-tensor or per-group scale",
        ),
        IntFormat(
            top=127.0,
            per_tensor_default=False,
            name="int8",
            bits=8,
            description="symmetric int8, scale per row of block or per group along c",
        ),
        IntFormat(
            top=7.0,
            per_tensor_default=False,
            name="int4",
            bits=4,
            description="symmetric int4 in [-7, 7], two codes per byte, scale per row of block or group",
        ),
    ]
    return {f.name: f for f in formats}


FORMATS: dict[str, QuantFormat] = _build_registry()


def get_format(name: str) -> QuantFormat:
    """The registered format called ``name``; unknown names raise ``InputError`` listing them."""
    if name not in FORMATS:
        others = [n for n in FORMATS if not n.startswith("float:t")]
        raise InputError(
            f"unknown quantization format {name!r}; choose one of float:t1 … float:t24, {', '.join(others)}"
        )
    return FORMATS[name]
